"""Evaluation: token perplexity and bits per byte at any length, length generalisation reports (generation is
``blockstate.generation``).

The protocol (every token scored once, whole documents, non-overlapping segments) is documented in
``blockstate.evaluation.evaluate``; ``blockstate eval`` is ``blockstate.cli.eval``.
"""

from blockstate.evaluation.evaluate import EvalResult, evaluate, head_documents
from blockstate.evaluation.report import PROTOCOL, write_report
from blockstate.evaluation.runner import parse_lengths, run_evaluation

__all__ = [
    "PROTOCOL",
    "EvalResult",
    "evaluate",
    "head_documents",
    "parse_lengths",
    "run_evaluation",
    "write_report",
]
