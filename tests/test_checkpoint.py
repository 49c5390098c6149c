"""A fresh run in an old run folder: the old checkpoints are set aside, so the new run's are saved
(orbax skips a step that is not newer than the folder's latest) and --resume never restores the
old run."""

import os

import jax.numpy as jnp

from loopjax.checkpoint import Checkpointer, set_aside


def _save(directory, steps):
    ckpt = Checkpointer(directory, keep=2)
    for s in steps:
        ckpt.save(s, {"x": jnp.full(3, float(s))}, {"iteration": s})
    latest = ckpt.latest_step()
    ckpt.close()
    return latest


def test_orbax_skips_older_steps_unless_set_aside(tmp_path):
    old, fresh = str(tmp_path / "a" / "checkpoints"), str(tmp_path / "b" / "checkpoints")
    assert _save(old, [9, 10]) == 10
    assert _save(old, [0, 1]) == 10  # what a fresh run in an old folder got before set_aside
    assert _save(fresh, [9, 10]) == 10
    assert set_aside(fresh) == fresh + ".previous"
    assert _save(fresh, [0, 1]) == 1
    ckpt = Checkpointer(fresh, keep=2)
    _, restored, meta = ckpt.restore({"x": jnp.zeros(3)})
    ckpt.close()
    assert meta["iteration"] == 1 and float(restored["x"][0]) == 1.0
    assert sorted(os.listdir(fresh + ".previous")) == ["10", "9"]


def test_nothing_to_set_aside(tmp_path):
    assert set_aside(str(tmp_path / "missing")) is None
    os.makedirs(tmp_path / "empty")
    assert set_aside(str(tmp_path / "empty")) is None
    assert os.path.isdir(tmp_path / "empty")


def test_step_zero_outlives_the_newest_two(tmp_path):
    """keep=2 keeps the newest two and step 0, a run's warm start (--init_from reads it)."""
    directory = str(tmp_path / "checkpoints")
    assert _save(directory, range(5)) == 4
    assert sorted(os.listdir(directory)) == ["0", "3", "4"]
    ckpt = Checkpointer(directory, keep=2)
    _, restored, meta = ckpt.restore({"x": jnp.zeros(3)}, step=0)
    ckpt.close()
    assert meta["iteration"] == 0 and float(restored["x"][0]) == 0.0
