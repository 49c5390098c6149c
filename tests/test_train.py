"""The main job end to end on a very small configuration: run folder, bounded compiles, and
SIGKILL at random moments + --resume giving the same metrics as an uninterrupted run."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough for CI: a 1-layer model, 4 tasks x 2 rollouts, 10 iterations (long enough that
# each attempt of the kill test is still running when it is killed); overlap off and no
# straggler cut so that batches do not depend on timing (resume equivalence needs that).
SMOKE = ["--scratch.hidden_size=32", "--scratch.num_layers=1", "--scratch.intermediate_size=64",
         "--scratch.head_dim=16", "--tasks_per_iteration=4", "--rollouts_per_task=2",
         "--iterations=10", "--sft_steps=4", "--sft_rows=2", "--max_eval_tasks=3",
         "--final_splits=dev", "--update.minibatch_size=8", "--eval_every=2",
         "--overlap_env=false", "--straggler_fraction=1.0", "--env_workers=2"]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "experiments.appworld_loop", *SMOKE, f"--run_dir={run_dir}", *extra]


def _clean(rec):
    """A log record without wall-clock and per-process compile counts."""
    return {k: v for k, v in rec.items() if k != "time" and not k.startswith(("time/", "compiles/"))}


def _metrics(run_dir):
    """Logged metrics by step, without wall-clock and per-process compile counts."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update(_clean(rec))
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("reference"))
    proc = subprocess.run(_cmd(run_dir), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout, proc.stderr


def test_run_folder_and_table(reference_run):
    run_dir, stdout, stderr = reference_run
    for name in ("metrics.jsonl", "config.json", "summary.json", "learning_curve.png",
                 "trajectories.html", "before_after.txt"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert os.listdir(os.path.join(run_dir, "events"))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints")))  # newest ones kept
    assert "TGC before" in stdout and "resolved config" in stdout
    # Orbax's absl INFO lines (about 20 per checkpoint save) are silenced; loopjax's own log stays.
    assert " absl: " not in stderr and " loopjax: " in stderr
    with open(os.path.join(run_dir, "learning_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    metrics = _metrics(run_dir)
    assert set(metrics) == set(range(11))
    for step in range(1, 11):
        m = metrics[step]
        for key in ("train/reward", "train/success", "adv/filtered_share", "train/doc_lookups",
                    "train/code_error_rate", "train/turns"):
            assert key in m, key
    assert "eval/dev/tgc" in metrics[2] and "eval/dev/sgc" in metrics[10]


def test_fresh_run_in_an_old_folder_sets_its_checkpoints_aside(reference_run, tmp_path):
    run_dir = str(tmp_path / "again")
    shutil.copytree(reference_run[0], run_dir)  # holds checkpoints 9 and 10 of a 10-iteration run
    # 3 iterations saving every 2nd (and the last): checkpoints 0 (before LOOP), 2 and 3 only.
    proc = subprocess.run(_cmd(run_dir, "--iterations=3", "--checkpoint_every=2",
                               "--keep_checkpoints=5", "--sft_steps=1"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["0", "2", "3"]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints.previous"))) == ["10", "9"]
    assert sorted(_metrics(run_dir)) == [0, 1, 2, 3]


def test_compiles_stay_bounded(reference_run):
    run_dir, *_ = reference_run
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
        buckets = json.load(f)["train"]["epochs"]["buckets"]
    # One update-step program per (bucket length, packed row count: a quarter of the minibatch at
    # most 4) at most, however many steps ran (0 when every rollout of this tiny run was filtered
    # for |A| < 0.01: this tiny policy's rollouts all score alike, so LOOP takes no step here;
    # the update step itself is tested in test_loop_update.py and test_update_gradient.py).
    bound = 4 * len(buckets)
    assert 0 <= summary["compiles"]["update"] <= bound
    # The sampler compiles per (row bucket, length bucket), log-bounded; 3 iterations + 3 evals
    # with different prompt lengths must not have compiled per call.
    assert sum(summary["compiles"]["sampler"].values()) <= 40
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        counts = [json.loads(l).get("compiles/update") for l in f]
    counts = [c for c in counts if c is not None]
    assert counts == sorted(counts) and counts[-1] <= bound


def _checkpoints(run_dir):
    """Complete checkpoint steps in a run folder (orbax renames a finished save to its step)."""
    folder = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _trained(run_dir, step):
    """The TrainState arrays a checkpoint holds, as NumPy."""
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(os.path.join(run_dir, "checkpoints", str(step), "state"))
    return jax.tree.map(np.asarray, tree)


def _records(run_dir):
    """metrics.jsonl as a list of (step, sorted keys) in the order written (a resumed run that
    wrote an iteration twice has more records)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], sorted(_clean(r))) for r in map(json.loads, f)]


def test_sigkill_and_resume_match_uninterrupted(reference_run, tmp_path):
    """Three SIGKILLs, each after a new checkpoint and before the run's last; every resumed attempt
    restores the newest checkpoint (iteration N > 0); the metrics, the log's records and the final
    trained state then equal the uninterrupted run's."""
    ref_dir, *_ = reference_run
    run_dir = str(tmp_path / "killed")
    rng = random.Random(1234)
    restored, killed_at = [], []
    for attempt, target in enumerate((1, 4, 7)):
        err_path = str(tmp_path / f"attempt{attempt}.err")
        with open(err_path, "w") as err:
            proc = subprocess.Popen(_cmd(run_dir, *(["--resume"] if attempt else [])), cwd=ROOT,
                                    env=_env(), stdout=subprocess.DEVNULL, stderr=err)
            deadline = time.monotonic() + 1800  # generous: a loaded 2-core machine is slow
            while proc.poll() is None and (not _checkpoints(run_dir)
                                           or _checkpoints(run_dir)[-1] < target):
                if time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"attempt {attempt} saved no checkpoint >= {target} in 1800 s")
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 1.5))  # a random moment of the iteration after it
            assert proc.poll() is None, f"attempt {attempt} ended before it was killed"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        killed_at.append(_checkpoints(run_dir)[-1])
        assert target <= killed_at[-1] < 10, killed_at  # after a checkpoint, before the last
        if attempt:
            restored.append(_resumed_from(err_path))
    final = subprocess.run(_cmd(run_dir, "--resume"), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    restored.append(_resumed_from(final.stderr))
    # Each attempt restored the newest checkpoint its predecessor left.
    assert restored == killed_at and all(n > 0 for n in restored), (restored, killed_at)
    ref, got = _metrics(ref_dir), _metrics(run_dir)
    assert _records(run_dir) == _records(ref_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step].keys() == ref[step].keys(), step
        for key, value in ref[step].items():
            if isinstance(value, float):
                assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
            else:
                assert got[step][key] == value, (step, key)
    # The final trained state (params, optimizer moments, step and skip counters) is the same.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 _trained(ref_dir, 10), _trained(run_dir, 10))


def _resumed_from(stderr_or_path):
    text = stderr_or_path
    if os.path.exists(stderr_or_path):
        with open(stderr_or_path) as f:
            text = f.read()
    found = re.findall(r"resuming \S+ at iteration (\d+)", text)
    assert len(found) == 1, text[-3000:]
    return int(found[0])
