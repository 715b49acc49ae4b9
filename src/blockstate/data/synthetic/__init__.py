"""Synthetic long-context tasks, generated offline from a seed: what the context states recall.

    task = make_task("mqar", seq_len=256, num_kv_pairs=16)   # or passkey, copy, induction, listops
    batch = task.train_batch(seed=0, step=17, batch_size=8)   # a SyntheticSet: input_ids, targets, distance
    tests = task.test_sets(seed=0, n=256)                     # held out: one set per report column
    loss = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch.targets).flatten(), ignore_index=-100)

``targets`` is aligned with the logits (no shift) and is -100 except at the scored answer positions. Every
task is a dataclass of options (``make_task`` validates them, naming a bad one); see each module for what the
generator follows: ``recall`` (MQAR as in Zoology, induction heads, selective copying), ``passkey`` (Landmark
Attention's passkey retrieval, distances in blocks), ``listops`` (Long Range Arena's ListOps generator).
``blockstate synthetic`` trains and scores models on them (``blockstate.benchmarks.synthetic``).
"""

from . import listops, passkey, recall  # noqa: F401  (registers the tasks)
from .base import TASKS, SyntheticSet, SyntheticTask, hf_labels, make_task, rng_for, task_names
from .listops import ListOps
from .passkey import Passkey
from .recall import MQAR, Induction, SelectiveCopy

__all__ = ["MQAR", "TASKS", "Induction", "ListOps", "Passkey", "SelectiveCopy", "SyntheticSet", "SyntheticTask",
           "hf_labels", "make_task", "rng_for", "task_names"]
