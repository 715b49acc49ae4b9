"""Training: config, optimiser and schedules, checkpoints, distributed wrappers, the loop.

Typical use::

    from blockstate.training import TrainConfig, Trainer
    result = Trainer(TrainConfig(steps=200, output="runs/demo")).run()
    print(result.test.bpb, result.checkpoint)

The command line is ``blockstate train`` (``blockstate.cli.train``).
"""

from blockstate.training.config import DEFAULT_TOKENS, TrainConfig, load_config_file, merge
from blockstate.training.optim import build_optimizer, group_of_parameters, lr_factor
from blockstate.training.state import TrainResult
from blockstate.training.trainer import Trainer

__all__ = [
    "DEFAULT_TOKENS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "group_of_parameters",
    "load_config_file",
    "lr_factor",
    "merge",
]
