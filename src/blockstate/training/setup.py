"""Building a run, in the order the trainer calls these: the directory (``prepare_dir``; marked as the run's by
``open_run`` only once the data and model are known to be good), the data, the model, the start-up lines; and
the sample a finished run ends with.

A start that fails on bad input leaves nothing behind that would block the corrected command: the directories it
created are removed again (``remove_empty_dirs``) and no ``run.json`` is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from blockstate.data import DataError, build_tokenizer, load_corpus, tokenize_split
from blockstate.generation import can_generate, set_token_ids
from blockstate.registry import create_model
from blockstate.runtime import checkpoint as ckpt_io
from blockstate.training import distributed as D
from blockstate.training.config import TrainConfig
from blockstate.training.metrics import format_seconds
from blockstate.training.optim import describe_groups
from blockstate.training.rundir import (
    RUN_FILE,
    check_fresh,
    check_writable,
    default_output,
    find_resume,
    resume_config,
    set_aside_newer,
    start_run,
)

logger = logging.getLogger("blockstate.train")


def prepare_dir(cfg: TrainConfig, info: D.DistInfo, *, resume: str | Path | None, explicit: dict[str, Any],
                overwrite: bool) -> tuple[TrainConfig, Path, Path | None, dict[str, Any], list[Path]]:
    """(the settings: the saved run's when resuming, the run directory, the checkpoint resumed from, its trainer
    state, the directories this start creates: removed again, when still empty, if it fails before ``open_run``)."""
    resume_ckpt, saved_state = None, {}
    if resume is not None:
        run_dir, resume_ckpt = find_resume(resume)
        cfg, saved_state = resume_config(run_dir, resume_ckpt, explicit)
    elif cfg.output is None:
        run_dir = D.broadcast_object(default_output(cfg) if info.is_main else None, info)
    else:
        run_dir = Path(cfg.output).expanduser()
    run_dir = Path(run_dir)
    new_dirs = [] if not info.is_main else [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    if info.is_main:
        check_writable(run_dir)
        if resume_ckpt is None:
            check_fresh(run_dir, overwrite)
    return cfg, run_dir, resume_ckpt, saved_state, new_dirs


def open_run(cfg: TrainConfig, info: D.DistInfo, run_dir: Path, resume_ckpt: Path | None, saved: dict[str, Any],
             overwrite: bool) -> str | None:
    """Mark the directory as this run's (``run.json``; on resume: set newer, damaged checkpoints aside); the run
    id, on every rank."""
    run_id = None
    if info.is_main:
        if resume_ckpt is None:
            run_id = start_run(run_dir, cfg, overwrite)["run_id"]
        else:
            set_aside_newer(run_dir, resume_ckpt)
            if (run_dir / RUN_FILE).is_file():
                run_id = ckpt_io.read_json(run_dir / RUN_FILE).get("run_id")
        run_id = run_id or saved.get("run_id")
    return D.broadcast_object(run_id, info)


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty; ``os.rmdir`` never removes a directory with files."""
    for path in dirs:
        try:
            path.rmdir()
        except OSError:
            return


def load_data(cfg: TrainConfig, info: D.DistInfo):
    """(corpus, tokenizer, the train split's tokens)."""
    corpus = load_corpus(cfg.data, **cfg.corpus_options())
    # rank 0 tokenises (and trains a BPE) first; the others then read its cache
    if not info.is_main:
        D.barrier(info)
    tokenizer = build_tokenizer(cfg.tokenizer, corpus, cache_dir=cfg.cache_dir)
    train = tokenize_split(corpus, tokenizer, "train", cache_dir=cfg.cache_dir)
    if info.is_main:
        D.barrier(info)
    return corpus, tokenizer, train


def load_held_out(cfg: TrainConfig, info: D.DistInfo, corpus: Any, tokenizer: Any) -> dict[str, Any]:
    """The validation and test splits' tokens (None for a split the corpus cannot provide)."""
    held = {}
    if not info.is_main:
        D.barrier(info)
    for split in ("validation", "test"):
        try:
            held[split] = tokenize_split(corpus, tokenizer, split, cache_dir=cfg.cache_dir)
        except DataError as exc:  # e.g. a one-document corpus: train anyway, say what is skipped
            if info.is_main:
                logger.warning("no %s evaluation: %s", split, exc)
            held[split] = None
    if info.is_main:
        D.barrier(info)
    return held


def build_model(cfg: TrainConfig, corpus: Any, tokenizer: Any, train_data: Any) -> tuple[torch.nn.Module, int]:
    """The model (seeded identically on every rank; DDP / FSDP start from the same weights anyway) and L."""
    torch.manual_seed(cfg.seed)
    overrides = dict(cfg.model_args)
    overrides["vocab_size"] = tokenizer.vocab_size
    for key, value in (("max_train_length", cfg.seq_len), ("block_size", cfg.block_size),
                       ("hidden_dropout", cfg.dropout)):
        if value is not None:
            overrides[key] = value
    model = create_model(cfg.model, cfg.size, **overrides)
    set_token_ids(model, tokenizer.eos_id)  # saved in config.json / generation_config.json: generate() stops at EOS
    seq_len = cfg.seq_len or int(getattr(model.config, "max_train_length", 0) or 512)
    if train_data.num_tokens < seq_len:
        raise ValueError(f"the train split of {corpus.name} has {train_data.num_tokens:,} tokens, fewer than one "
                         f"segment of --seq-len {seq_len}: use a smaller --seq-len or a larger corpus")
    return model, seq_len


def check_segment_order(cfg: TrainConfig, stateful: bool) -> None:
    """``--lane-span`` only for a model that carries state across segments, ``--packing`` only for one that
    does not (it reads documents in order, in contiguous lanes with reset flags)."""
    if cfg.lane_span and not stateful:
        raise ValueError(f"--lane-span applies to models that carry state across segments (slide, transformer-xl, "
                         f"brect); {cfg.model} reads shuffled segments: drop --lane-span")
    if stateful and cfg.packing:
        raise ValueError(f"{cfg.model} carries state across segments and trains on documents in order "
                         "(contiguous lanes with reset flags): drop --packing")


def block_label(config: Any) -> str:
    """W as the log prints it: gpt's one block as long as any input (FULL_ATTENTION) reads ``full``."""
    from blockstate.models.configuration_baselines import FULL_ATTENTION

    size = getattr(config, "block_size", None)
    return "full" if isinstance(size, int) and size >= FULL_ATTENTION else str(size)


def describe_run(say: Any, cfg: TrainConfig, info: D.DistInfo, *, corpus: Any, tokenizer: Any, train_data: Any,
                 model: torch.nn.Module, n_params: int, optimizer: torch.optim.Optimizer, state: Any,
                 budget_s: float | None, run_dir: Path, precision: str) -> None:
    """The three start-up lines: data, model, run."""
    say(f"data: {corpus.name} ({cfg.tokenizer}, vocab {tokenizer.vocab_size}): train "
        f"{train_data.num_tokens:,} tokens in {train_data.num_documents} documents; "
        f"read: {corpus.stats.summary()}")
    say(f"model: {cfg.model} size={cfg.size}, {n_params:,} parameters, L={state.seq_len}, "
        f"W={block_label(model.config)}; {cfg.optimizer} groups "
        + ", ".join(f"{g['name']}={g['params']:,}@{g['lr']:.0e}" for g in describe_groups(optimizer)))
    total = state.total_steps
    budget = (f"{total} steps" if total else "") + (
        f"{' or ' if total else ''}{format_seconds(budget_s)} of training" if budget_s else "")
    say(f"run: {run_dir} | global batch {state.global_batch} x {state.seq_len} tokens | {budget} | "
        f"{info.world_size} process(es) on {info.device}"
        + (" with bf16 autocast" if precision == "bf16 autocast" else " in fp32")
        + (f" | resumed at step {state.step}" if state.step else ""))


def sample_text(cfg: TrainConfig, wrapped: torch.nn.Module, info: D.DistInfo, ckpt_dir: Path | None,
                tokenizer: Any) -> str:
    """``cfg.sample_tokens`` tokens sampled from the trained model after the prompt (rank 0)."""
    from blockstate.generation import SamplingConfig, generate_text

    model = D.unwrap(wrapped)
    if info.parallel == "fsdp" and info.enabled:  # sharded weights: read the full model back on this rank
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt_dir, use_safetensors=True).to(info.device)
    prompt = cfg.sample_prompt
    if prompt is None:  # something that suits the built-in corpora; elsewhere start a fresh document
        prompt = {"python-stdlib": "def ", "shakespeare": "ROMEO:"}.get(cfg.data, "")
    sampling = SamplingConfig(max_new_tokens=cfg.sample_tokens, temperature=max(0.0, cfg.temperature), seed=cfg.seed)
    if not can_generate(model):
        logger.warning("no sample: %s has no generate() yet", type(model).__name__)
        return ""
    return prompt + generate_text(model, tokenizer, prompt, sampling)  # HF generate(), the one generation path
