"""``blockstate ablate``: BST's knobs measured one at a time at equal parameters and tokens, in one table.

Every arm is the reference model (BST:SH:S4 at the chosen size, the paper's configuration) with one or a few
settings changed. Arms that add parameters are brought back to the reference's count by narrowing the FFN
(``intermediate_size``), so the table compares designs, not sizes; the parameter count of every arm is printed
beside its score. Arms are trained and scored by ``blockstate compare``'s own ``train_one`` / ``evaluate_one``
(same corpus, tokenizer, seed, data order and recipe), each in its own run directory, so an interrupted ablation
resumes where it stopped and finished arms are skipped.

Scores are on the VALIDATION split: the ablation chooses the presets, so it must not look at the test split that
``blockstate compare`` reports.

Arms (``--arms``; ``paper:`` the paper's design space, ``ref:`` baselines as registered, for scale, ``beyond:``
options the paper does not have, with the reason in ``blockstate.layers.bst``; ``diag:`` GSS-Hybrid with one part
changed, to see where its lead comes from):
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from blockstate.benchmarks.common import machine, write_json


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    what: str  # one line for the table
    model: str = "bst-sh-s4"
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    beyond_paper: bool = False
    reference: bool = False  # a baseline as registered (its own recipe knobs), for scale: not equalised
    diagnostic: bool = False  # a reference with one setting changed, to see where its score comes from: not
    # equalised either, so its count may move by more than the registry's 5% (the table prints it)


def default_arms(num_layers: int) -> list[Arm]:
    """The arms for a stack of ``num_layers`` layers (the layer layouts depend on the depth)."""
    from blockstate.models.configuration_blockstate import default_bst_layers

    upper = list(range(num_layers // 2, num_layers))
    every_other = list(range(0, num_layers, 2))
    return [
        Arm("paper", "BST:SH:S4, the paper's configuration (BST layers at the preset's indices)"),
        Arm("layers-first", "only the first layer is a BST layer", model_args={"bst_layers": [0]}),
        Arm("layers-first-upper", "first + upper half", model_args={"bst_layers": sorted({0, *upper})}),
        *([] if every_other == default_bst_layers(num_layers) else  # 4 layers: the paper arm already is this
          [Arm("layers-every-other", "every other layer", model_args={"bst_layers": every_other})]),
        Arm("layers-all", "every layer a BST layer", model_args={"bst_layers": list(range(num_layers))}),
        Arm("previous-block", "blocks also attend to the previous block (W x 2W tile)",
            model_args={"attend_previous_block": True}),
        Arm("block-half", "W halved", model_args={"block_size": "half"}),
        Arm("block-double", "W doubled", model_args={"block_size": "double"}),
        Arm("state-64", "S4D state N = 64 (from 16)", model_args={"ssm_state_size": 64}),
        Arm("s4d-inv", "S4D-Inv initialisation (from S4D-Lin)", model_args={"s4d_init": "inv"}),
        Arm("dt-slow", "S4D dt in [1e-4, 1e-2] (from [1e-3, 1e-1]): longer memory at init",
            model_args={"ssm_dt_min": 1e-4, "ssm_dt_max": 1e-2}),
        Arm("ssm-lr-full", "SSM parameters at the full learning rate (from min(lr, 1e-3))",
            train_args={"ssm_lr": "lr"}),
        Arm("unstructured", "unstructured (implicit) kernel", model="bst-sh-unstructured"),
        Arm("mf", "multi-filter variant (S states per block)", model="bst-mf-s4"),
        Arm("mh", "multi-head variant (one filter per head)", model="bst-mh-s4"),
        Arm("gated", "SSM output also added to the residual stream, gated", beyond_paper=True,
            model_args={"ssm_residual": "gated"}),
        Arm("gated-all", "gated, every layer a BST layer", beyond_paper=True,
            model_args={"ssm_residual": "gated", "bst_layers": list(range(num_layers))}),
        Arm("gated-all-previous", "gated, every layer a BST layer, previous block", beyond_paper=True,
            model_args={"ssm_residual": "gated", "bst_layers": list(range(num_layers)),
                        "attend_previous_block": True}),
        Arm("ffn", "the FFN of BST layers a GLU gated by the SSM output", beyond_paper=True,
            model_args={"ssm_residual": "ffn"}),
        Arm("ffn-previous", "SSM-gated FFN, previous block", beyond_paper=True,
            model_args={"ssm_residual": "ffn", "attend_previous_block": True}),
        Arm("ffn-previous-full", "SSM-gated FFN, the whole previous block (W..2W keys, not a W window)",
            beyond_paper=True, model_args={"ssm_residual": "ffn", "attend_previous_block": True,
                                           "previous_block": "full"}),
        Arm("gss-stack", "GSS-Hybrid's stack (depth, GSS layers) with its attention layers made BST layers",
            beyond_paper=True, model_args={"layout": "gss-hybrid"}),
        Arm("gss-stack-tuned", "GSS-Hybrid's stack, its attention layers BST layers with the SSM-gated FFN and "
            "the previous block", beyond_paper=True,
            model_args={"layout": "gss-hybrid", "ssm_residual": "ffn", "attend_previous_block": True}),
        Arm("ffn-every-layer", "SSM-gated FFN in every layer; cross-attention in the BST layers only",
            beyond_paper=True, model_args={"ssm_residual": "ffn", "attend_previous_block": True,
                                           "ssm_residual_layers": "all"}),
        # the preset's settings with the two paper-space knobs that each helped on their own (state-64, dt-slow)
        Arm("ffn-previous-state-64", "SSM-gated FFN, previous block, N = 64", beyond_paper=True,
            model_args={"ssm_residual": "ffn", "attend_previous_block": True, "ssm_state_size": 64}),
        Arm("ffn-previous-dt-slow", "SSM-gated FFN, previous block, dt in [1e-4, 1e-2]", beyond_paper=True,
            model_args={"ssm_residual": "ffn", "attend_previous_block": True, "ssm_dt_min": 1e-4,
                        "ssm_dt_max": 1e-2}),
        Arm("ffn-previous-long", "SSM-gated FFN, previous block, N = 64, dt in [1e-4, 1e-2]", beyond_paper=True,
            model_args={"ssm_residual": "ffn", "attend_previous_block": True, "ssm_state_size": 64,
                        "ssm_dt_min": 1e-4, "ssm_dt_max": 1e-2}),
        Arm("mf-ffn", "MF, SSM-gated FFN", model="bst-mf-s4", beyond_paper=True, model_args={"ssm_residual": "ffn"}),
        Arm("ffn-all", "SSM-gated FFN, every layer a BST layer", beyond_paper=True,
            model_args={"ssm_residual": "ffn", "bst_layers": list(range(num_layers))}),
        Arm("ffn-all-previous", "SSM-gated FFN, every layer a BST layer, previous block", beyond_paper=True,
            model_args={"ssm_residual": "ffn", "bst_layers": list(range(num_layers)),
                        "attend_previous_block": True}),
        Arm("mf-gated-all", "MF, gated, every layer a BST layer", model="bst-mf-s4", beyond_paper=True,
            model_args={"ssm_residual": "gated", "bst_layers": list(range(num_layers))}),
        Arm("mf-ffn-all", "MF, SSM-gated FFN, every layer a BST layer", model="bst-mf-s4", beyond_paper=True,
            model_args={"ssm_residual": "ffn", "bst_layers": list(range(num_layers))}),
        Arm("ref-gss-hybrid", "reference: GSS-Hybrid as registered", model="gss-hybrid", reference=True),
        Arm("ref-gpt", "reference: full attention (gpt) as registered", model="gpt", reference=True),
        # GSS-Hybrid taken apart: where its lead comes from (its own count, not equalised)
        Arm("gss-no-attention", "diagnostic: GSS-Hybrid without its attention layer (GSS layers only)",
            model="gss-hybrid", reference=True, diagnostic=True, model_args={"attention_layers": []}),
        Arm("gss-s4d", "diagnostic: GSS-Hybrid with BST's S4D kernel (N = 16 per channel) for DSS",
            model="gss-hybrid", reference=True, diagnostic=True, model_args={"gss_kernel": "s4d"}),
    ]


def _resolve(arm: Arm, base: dict[str, Any], size: str = "tiny") -> dict[str, Any]:
    """Relative values (``block_size: half``) against the reference config's fields; ``layout: gss-hybrid``:
    GSS-Hybrid's depth and GSS layers at ``size``, its attention layers as the BST layers."""
    from blockstate.models.configuration_baselines import GatedStateSpaceConfig
    from blockstate.registry import GSS

    args = dict(arm.model_args)
    if args.pop("layout", None) == "gss-hybrid":
        layers = GatedStateSpaceConfig(**GSS[size]).attention_layers
        args = {**GSS[size], "bst_layers": layers, "plain_layers": "gss", **args}
    if args.get("block_size") in ("half", "double"):
        w = base["block_size"]
        args["block_size"] = max(1, w // 2) if args["block_size"] == "half" else 2 * w
    return args


def equalize(model: str, size: str, args: dict[str, Any], target: int) -> tuple[dict[str, Any], int]:
    """Widen or narrow the FFN (``intermediate_size``, in steps of 32) to bring the model to ~``target``
    parameters (``blockstate.registry.matched_ffn``): returns the overrides to use and the resulting count. Arms
    within 1% are kept as they are."""
    from blockstate.registry import count_model_parameters, matched_ffn

    count = count_model_parameters(model, size, **args)
    if abs(count - target) <= 0.01 * target:
        return args, count
    args = {**args, "intermediate_size": matched_ffn(model, size, args, target)}
    if args["intermediate_size"] <= 32:
        raise ValueError(f"arm {args} cannot be brought to {target:,} parameters by narrowing the FFN")
    return args, count_model_parameters(model, size, **args)


def plan(size: str, arms: list[Arm], base_args: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every arm's model, overrides (parameters equalised) and parameter count, before anything trains.
    ``base_args`` are config overrides applied to the reference and every arm (an arm's own settings win)."""
    from blockstate.registry import REFERENCE_MODEL, count_model_parameters, model_config

    base_args = dict(base_args or {})
    reference = model_config(REFERENCE_MODEL, size, **base_args)
    target = count_model_parameters(REFERENCE_MODEL, size, **base_args)
    rows = []
    for arm in arms:
        args = {**base_args, **_resolve(arm, {"block_size": reference.block_size}, size)}
        if arm.reference:  # the registry already matches every baseline to the reference within 5%
            count = count_model_parameters(arm.model, size, **args)
        else:
            args, count = equalize(arm.model, size, args, target)
        rows.append({"arm": arm.name, "what": arm.what, "model": arm.model, "model_args": args,
                     "train_args": dict(arm.train_args), "beyond_paper": arm.beyond_paper,
                     "reference": arm.reference, "diagnostic": arm.diagnostic, "parameters": count,
                     "parameter_ratio": round(count / target, 4)})
    return rows


def _kind(arm: Arm) -> str:
    return ("beyond: " if arm.beyond_paper else "diag:   " if arm.diagnostic else "ref:    " if arm.reference
            else "paper:  ")


ARM_DOC = "\n".join(f"  {a.name:<20} {_kind(a)}{a.what}" for a in default_arms(4))
__doc__ += ARM_DOC + "\n"


def markdown(payload: dict[str, Any]) -> str:
    """One table: arm, what changed, parameters, validation bits/byte at each length, delta to the paper arm."""
    lengths = payload["lengths"]
    rows = payload["arms"]
    paper = next((r for r in rows if r["arm"] == "paper" and r.get("results")), None)
    head = ["arm", "change", "parameters"] + [f"bits/byte {x}" for x in lengths] + ["vs paper (1x)", "train min"]
    lines = [f"Ablation on {payload['corpus']} ({payload['size']}, {payload['tokens']:,} tokens per arm, seq_len "
             f"{payload['seq_len']}, validation split; {payload['machine']['device']}, torch "
             f"{payload['machine']['torch']})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = r.get("results") or []
        cells = [f"{x['bpb']:.4f}" for x in res] + ["-"] * (len(lengths) - len(res))
        delta = "-" if not (paper and res) else f"{res[0]['bpb'] - paper['results'][0]['bpb']:+.4f}"
        minutes = "-" if r.get("train_seconds") is None else f"{r['train_seconds'] / 60:.1f}"
        what = ("(beyond the paper) " if r["beyond_paper"] else "") + r["what"]
        if r.get("reference"):
            what = f"*{what}*"
        lines.append(f"| {r['arm']} | {what} | {r['parameters'] / 1e6:.2f}M | " + " | ".join(cells)
                     + f" | {delta} | {minutes} |")
    return "\n".join(lines) + "\n"


def run(settings: Any, arms: list[Arm], log: Any = print) -> dict[str, Any] | None:
    """Train and score every arm (``settings``: a ``CompareSettings`` giving corpus, size, tokens, recipe); write
    ablation.{md,json} under ``settings.output_dir()``. None when interrupted."""
    from blockstate.benchmarks.compare import evaluate_one, train_one

    corpus = settings.corpora[0]
    rows = plan(settings.size, arms, settings.model_args)
    info = machine()
    log(f"ablation on {info['device']}: {len(rows)} arms, size {settings.size}, {settings.tokens:,} tokens each, "
        f"corpus {corpus}, scored on the validation split")
    started = time.perf_counter()
    for row in rows:
        train_args = {k: settings.base_lr() if v == "lr" else v for k, v in row["train_args"].items()}
        arm_settings = dataclasses.replace(settings, models=[row["model"]], model_args=row["model_args"],
                                           train_args=train_args, split="validation",
                                           runs=Path(settings.runs) / row["arm"])
        train = train_one(arm_settings, corpus, row["model"], log)
        if train["status"] == "interrupted":
            log(f"interrupted while training arm {row['arm']}: rerun the same command to continue")
            return None
        ev = evaluate_one(arm_settings, corpus, row["model"], log)
        row.update(train_seconds=train.get("train_seconds"), results=ev["results"],
                   run_dir=str(arm_settings.run_dir(corpus, row["model"])))
        log(f"   {row['arm']}: {train['status']}, {ev['status']}: "
            + ", ".join(f"{r['bpb']:.4f}" for r in ev["results"]) + " bits/byte")
    payload = {"benchmark": "ablation", "command": settings.command, "machine": info, "corpus": corpus,
               "size": settings.size, "tokens": settings.tokens, "seq_len": settings.seq_len,
               "lengths": settings.lengths.split(","), "wall_seconds_this_invocation":
               round(time.perf_counter() - started, 1), "arms": rows}
    out = settings.output_dir()
    write_json(out / "ablation.json", payload)
    (out / "ablation.md").write_text(markdown(payload), encoding="utf-8")
    log(markdown(payload))
    log(f"wrote {out / 'ablation.json'} and ablation.md")
    return payload
