"""Orbax checkpoints holding everything a run needs to resume exactly where it stopped.

Each checkpoint = the TrainState's trained part (LoRA or full params, optimizer state, step, skip
counters) as sharded arrays, plus a JSON record of the host-side state (iteration, PRNG key data,
task-sampler state, evaluation history). Orbax writes into a temporary folder and renames it when
complete, so a crash mid-save (even SIGKILL) leaves the previous checkpoint as the newest valid one.
The frozen base weights are not saved: they come from the --model folder (or are the trained part).
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger(__name__)


def set_aside(directory: str) -> str | None:
    """Moves a previous run's checkpoints out of a fresh run's way, to `<directory>.previous`
    (replacing an older one there); returns that path, or None when there was nothing to move.

    Orbax skips saving a step that is not newer than the folder's latest one, so a fresh run in an
    old folder would otherwise save nothing, and a later --resume would restore the old run."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory) or not os.listdir(directory):
        return None
    previous = directory + ".previous"
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(directory, previous)
    log.warning("a fresh run: the previous run's checkpoints moved to %s (use --resume to "
                "continue a run instead)", previous)
    return previous


class Checkpointer:
    """The newest `keep` checkpoints, and step 0 (a run's warm start, which --init_from reads)."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        kept = cm.AnyPreservationPolicy([cm.LatestN(keep), cm.CustomSteps([0])])
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=kept, create=True,
                                                 enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trained, meta: dict) -> None:
        """trained: a pytree of arrays (sharded or not); meta: JSON-serializable host state."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(trained),
                                                         meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, abstract_trained, step: int | None = None):
        """(step, trained, meta) of the newest (or given) checkpoint, placed like `abstract_trained`
        (a pytree of jax.ShapeDtypeStruct with shardings, e.g. from jax.eval_shape + shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory} to resume from")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_trained), meta=ocp.args.JsonRestore()))
        log.info("restored checkpoint %d from %s", step, self.directory)
        return step, out["state"], out["meta"]

    def close(self):
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs with the shardings of `tree`'s arrays (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
