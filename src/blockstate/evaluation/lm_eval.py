"""lm-eval-harness (EleutherAI ``lm-eval`` 0.4) for blockstate models: ``--model blockstate``.

``blockstate lm-eval ARGS...`` runs lm-eval's own command line after :func:`register` (and after ``import
blockstate``, which registers the Auto classes, so ``--model hf --model_args pretrained=DIR`` loads a blockstate
model too where the directory holds a transformers tokenizer)::

    blockstate lm-eval --model blockstate --model_args pretrained=runs/RUN --tasks TASK --batch_size 8

``BlockStateLM`` loads a run directory, a ``checkpoints/step-N`` directory or a ``save_pretrained`` directory
through the project's loader (``blockstate.evaluation.runner.load_checkpoint``: safetensors only, its own
tokenizer) and serves the three request types, batched:

- ``loglikelihood``: every text is read as a document is in training and in ``blockstate eval``: after the
  document separator (EOS), which ``tok_encode`` puts first (``add_bos_token=False`` turns that off). So the
  log-likelihood of a continuation equals the project's evaluation of context + continuation minus that of the
  context (tested);
- ``loglikelihood_rolling``: lm-eval's disjoint windows of ``max_length`` predictions with one token of overlap,
  which is the project's segmentation at evaluation length ``max_length + 1``: the numbers (and bits per byte)
  are ``blockstate eval``'s (tested);
- ``generate_until``: Hugging Face ``generate()`` through the model's streaming cache, left-padded batches
  (models whose cache takes no padding, the Block-Recurrent Transformer, are batched by prompt length), stop
  strings checked on the decoded text.

Model arguments (``--model_args k=v,...``): ``pretrained`` (required), ``device`` (default cuda when available),
``dtype`` (``float32``, ``bfloat16``, ``float16``: the model cast, SSM parameters stay fp32), ``max_length``
(default: the training length), ``max_gen_toks`` (256), ``add_bos_token`` (true), ``tokenizer`` (as
``blockstate eval --tokenizer``). ``--batch_size`` is the number of rows per forward (``auto``: 16).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM

MODEL_NAME = "blockstate"
AUTO_BATCH = 16
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y")
    return bool(value)


class BlockStateLM(TemplateLM):
    """lm-eval's model interface over a blockstate checkpoint (see the module doc)."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | str = True, tokenizer: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        from blockstate.runtime.loading import load_checkpoint

        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's --device defaults to cuda:0 on every machine; without CUDA that default means the CPU
            device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = load_checkpoint(pretrained, tokenizer=tokenizer, device=device)
        self.model, self.tokenizer_ = loaded.model, loaded.tokenizer
        if dtype not in (None, "auto"):
            if str(dtype) not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            self.model = self.model.to(DTYPES[str(dtype)])  # the SSM's parameters stay fp32 (LongConvSSM._apply)
        self.model.eval()
        self._device = torch.device(device)
        self.name = loaded.name
        self._max_length = int(max_length or loaded.train_length or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _flag(add_bos_token)
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = AUTO_BATCH
        self.batch_size = max(1, int(batch_size))
        if max_batch_size:
            self.batch_size = min(self.batch_size, int(max_batch_size))
        self.batch_sizes = {}  # lm-eval's results table reads it
        # rows of one generate() batch must have equal lengths for a cache that takes no padding
        self.pad_prompts = not hasattr(self.model, "recurrent_forward")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> BlockStateLM:
        """``--model_args`` win over the command line's ``--device`` / ``--batch_size`` (which lm-eval always
        passes, ``--device`` defaulting to cuda:0), instead of the two clashing."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> BlockStateLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- what lm-eval reads ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer_.eos_id)  # the document separator of training

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer_, "kind", "blockstate")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; with ``add_special_tokens`` (default: ``add_bos_token``) the document
        separator first, as training and ``blockstate eval`` read every document."""
        ids = list(self.tokenizer_.encode(string))
        first = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return [self.eot_token_id, *ids] if first else ids

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer_.decode([int(t) for t in tokens if int(t) != self.eot_token_id])

    # -- scoring --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded rows -> fp32 logits (B, T, V). A causal model computes the real positions of each row
        exactly as alone; the mask says where each row ends."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        kwargs = {} if bool(mask.all()) else {"attention_mask": mask.to(self.device)}
        return self.model(input_ids=ids.to(self.device), **kwargs).logits.float()

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per request; longest
        first, ``batch_size`` rows per forward; contexts longer than ``max_length`` lose their left end."""
        from tqdm.auto import tqdm

        batch = override_bs or self.batch_size
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            rows, conts = [], []
            for i in index:
                _, context, continuation = requests[i]
                if not continuation:
                    raise ValueError("lm-eval passed an empty continuation")
                rows.append((list(context) + list(continuation))[-(self.max_length + 1) :][:-1])
                conts.append(list(continuation)[-self.max_length :])
            logits = self._logits(rows)
            for b, i in enumerate(index):
                n, end = len(conts[b]), len(rows[b])
                logp = F.log_softmax(logits[b, end - n : end], dim=-1)
                target = torch.tensor(conts[b], device=logp.device)
                ll = float(logp.gather(-1, target[:, None]).sum())
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = (ll, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (ll, greedy))
            bar.update(len(index))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in lm-eval's disjoint windows (one token of context between windows, the
        first predicted from the document separator): ``blockstate eval`` at length ``max_length + 1``."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0], add_special_tokens=False)
            for window in get_rolling_token_windows(token_list=tokens, prefix_token=self.eot_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                context, continuation = make_disjoint_window(window)
                windows.append((None, context, continuation))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scores):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # -- generation -----------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations by ``generate()`` (greedy unless the task samples), cut at the first stop string."""
        from lm_eval.models.utils import normalize_gen_kwargs
        from tqdm.auto import tqdm

        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):  # one generate() call per set of generation settings
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for index in groups.values():
            kwargs = normalize_gen_kwargs(requests[index[0]].args[1], self.max_gen_toks)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(kwargs.pop("max_gen_toks"))
            if new_tokens >= self.max_length:
                raise ValueError(f"max_gen_toks ({new_tokens}) must be below max_length ({self.max_length})")
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - new_tokens) :] or
                       [self.eot_token_id] for i in index}
            by_length = sorted(index, key=lambda i: -len(prompts[i]))
            batches = ([by_length[s : s + self.batch_size] for s in range(0, len(by_length), self.batch_size)]
                       if self.pad_prompts else _equal_length_batches(by_length, prompts, self.batch_size))
            for rows in batches:
                texts = self._generate([prompts[i] for i in rows], new_tokens, until, kwargs)
                for i, text in zip(rows, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(rows))
        bar.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], new_tokens: int, until: list[str],
                  kwargs: dict[str, Any]) -> list[str]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding: every row's next token is at the end
            ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[b, width - len(p) :] = 1
        decode = self.tok_decode

        class StopStrings(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
                done = [any(s in decode(row[width:].tolist()) for s in until) for row in input_ids]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
        options = {"temperature": temperature} if sample else {}
        for key in ("top_p", "top_k"):
            if sample and key in kwargs:
                options[key] = kwargs[key]
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=new_tokens,
            do_sample=sample, eos_token_id=self.eot_token_id, pad_token_id=self.eot_token_id,
            stopping_criteria=StoppingCriteriaList([StopStrings()]) if until else None, **options,
        )
        texts = []
        for row in out[:, width:].tolist():
            if self.eot_token_id in row:
                row = row[: row.index(self.eot_token_id)]
            text = self.tok_decode(row)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


def _equal_length_batches(index: list[int], prompts: dict[int, list[int]], size: int) -> list[list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i in index:
        groups[len(prompts[i])].append(i)
    return [rows[s : s + size] for rows in groups.values() for s in range(0, len(rows), size)]


def register() -> None:
    """Make ``--model blockstate`` known to lm-eval (idempotent)."""
    import lm_eval.models  # noqa: F401 - lm-eval fills its lazy registry only while it is empty: fill it first
    from lm_eval.api.registry import model_registry

    model_registry.register(MODEL_NAME, target=BlockStateLM)
