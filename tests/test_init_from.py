"""Runs that start from another run's warm start (--init_from): LOOP on the success reward, a
refused mismatch, and experiments/headroom.py measuring that warm start. The reference run is
test_train.py's smoke run (run again here: pytest --dist loadfile gives each file a worker)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

import test_train
from loopjax import episodes
from test_train import ROOT, SMOKE, _cmd, _env, _episodes, _metrics, _trained

reference_run = test_train.reference_run  # the smoke run, a module-scoped fixture


def test_init_from_another_runs_warm_start_with_the_success_reward(reference_run, tmp_path):
    """--init_from: no warm start of its own; checkpoint 0, the "before" evaluation's metrics and
    episodes are the reference run's. --reward=success: the advantages are the leave-one-out ones
    of 0/1 success, while some rollouts earned a partial share of their tests."""
    ref_dir, *_ = reference_run
    run_dir, out = str(tmp_path / "from"), str(tmp_path / "recorded.json")
    cmd = [sys.executable, os.path.join(ROOT, "tests", "recording_worker.py"), out, *SMOKE,
           f"--run_dir={run_dir}", f"--init_from={ref_dir}", "--reward=success",
           "--iterations=2", "--eval_every=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        seen = json.load(f)
    assert seen["sft"] == []
    jax.tree.map(np.testing.assert_array_equal, _trained(run_dir, 0), _trained(ref_dir, 0))
    assert _metrics(run_dir)[0] == _metrics(ref_dir)[0]
    before = [e for e in _episodes(ref_dir) if e["iteration"] == 0]
    assert [e for e in _episodes(run_dir) if e["iteration"] == 0] == before
    partial = 0
    for it in seen["iterations"]:
        success, groups, adv = (np.array(it[k]) for k in ("success", "groups", "adv"))
        partial += int(np.sum((np.array(it["rewards"]) > 0) & ~success))
        for g in np.unique(groups):
            r, n = success[groups == g].astype(float), np.sum(groups == g)
            want = n / (n - 1) * (r - r.mean()) if n > 1 else np.zeros(1)
            np.testing.assert_allclose(adv[groups == g], want, atol=1e-6)
    assert partial > 0  # the test tells success from the share of tests


def test_init_from_a_run_of_other_episodes_is_refused(reference_run, tmp_path):
    proc = subprocess.run(_cmd(str(tmp_path / "other"), f"--init_from={reference_run[0]}",
                               "--max_interactions_eval=2"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "its max_interactions_eval is 4, this run's 2" in proc.stderr, proc.stderr[-2000:]


def test_headroom_measures_the_warm_start_a_run_started_from(reference_run, tmp_path):
    """experiments/headroom.py --init_from=RUN: greedy episodes are that run's "before" ones
    (not a warm start of its own: --sft_steps=1 would give other episodes), and its sampled
    rollouts give pass@1, pass@K and the mixed share."""
    ref_dir, *_ = reference_run
    out = str(tmp_path / "headroom.json")
    cmd = [sys.executable, "-m", "experiments.headroom", *SMOKE, f"--run_dir={tmp_path}",
           f"--init_from={ref_dir}", "--sft_steps=1", "--samples=2", "--splits=test_normal",
           f"--out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        sampled = json.load(f)["splits"]["test_normal"]["sampled"]
    assert sampled["tasks"] == 36 and 0.0 <= sampled["pass@1"] <= sampled["pass@2"] <= 1.0
    measured = {e["task_id"]: e for e in
                episodes.read(tmp_path / f"headroom-{os.path.basename(ref_dir)}" / episodes.FILE)
                if e["tag"] == "greedy"}
    before = [e for e in _episodes(ref_dir) if e["tag"] == "before LOOP"]
    assert len(before) == 3
    for e in before:
        assert measured[e["task_id"]]["turns"] == e["turns"], e["task_id"]
