"""LOOP: the objective (objective.py), the jitted update step (update.py), the epochs (epochs.py).

    from loopjax.loop import advantages, keep_mask, policy_loss
"""

from loopjax.config import EpochConfig, UpdateConfig
from loopjax.loop.epochs import run_iteration
from loopjax.loop.objective import advantages, keep_mask, policy_loss
from loopjax.loop.update import TrainState, init_train_state, make_update_step, split_params

__all__ = ["advantages", "keep_mask", "policy_loss", "TrainState", "UpdateConfig",
           "init_train_state", "make_update_step", "split_params", "EpochConfig", "run_iteration"]
