"""What training, evaluation and the benchmarks share, importing none of them.

- ``checkpoint``: the checkpoint format (safetensors weights, optimiser and RNG state, atomic writes);
- ``manifest``: per-checkpoint file sizes and sha256, checked before anything is read;
- ``loading``: a run / checkpoint / ``save_pretrained`` directory to a model and its tokenizer;
- ``device``: the device and precision policy (``--device``, ``--precision``).

Layering: ops -> layers -> models -> (data, runtime) -> training, evaluation -> benchmarks -> cli.
"""
