"""The LOOP update: leave-one-out advantages, the clipped surrogate, the jitted update step, epochs."""

from loopjax.loop.advantages import advantages, keep_mask
from loopjax.loop.epochs import EpochConfig, pack_minibatch, run_iteration
from loopjax.loop.losses import policy_loss
from loopjax.loop.update import (Batch, TrainState, UpdateConfig, init_train_state,
                                 make_update_step)

__all__ = ["advantages", "keep_mask", "policy_loss", "Batch", "TrainState", "UpdateConfig",
           "init_train_state", "make_update_step", "EpochConfig", "pack_minibatch", "run_iteration"]
