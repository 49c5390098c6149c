"""The main job end to end on a very small configuration: LOOP update steps on real miniworld
rewards, run folder, bounded compiles, SIGKILL at random moments + --resume giving the same
metrics as an uninterrupted run, and the RFT warm start and `adv_positive_only` in a run."""

import collections
import dataclasses
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

from loopjax import episodes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough for CI, and a policy whose rollouts of one task earn different rewards (so LOOP
# takes update steps): a 2-layer, 64-wide model, SFT for 250 steps x 4 rows on the dev split's 36
# tasks (train_split=dev: held-out evaluation is on test_normal), 6 tasks x 4 rollouts at
# temperature 0.7, 10 iterations (long enough that each attempt of the kill test is still running
# when it is killed). Measured with seed 0 (the default): iteration 0's 6 tasks had 2 with mixed
# rewards (contact_phone 1/1/0.5/1, balance_question 0.5/0.5/0.5/1), iteration 1's had 1; at 150
# steps x 2 rows or 100 x 4 at lr 1e-2 no task's rollouts differed. Overlap off and no straggler
# cut so that batches do not depend on timing (resume equivalence needs that); every checkpoint
# kept so that each iteration's update can be compared with the one before.
SMOKE = ["--scratch.hidden_size=64", "--scratch.num_layers=2", "--scratch.intermediate_size=128",
         "--scratch.head_dim=16", "--train_split=dev", "--tasks_per_iteration=6",
         "--rollouts_per_task=4", "--temperature=0.7", "--iterations=10", "--sft_steps=250",
         "--sft_rows=4", "--max_eval_tasks=3", "--final_splits=test_normal",
         "--eval_split=test_normal", "--update.minibatch_size=8", "--eval_every=2",
         "--keep_checkpoints=11", "--overlap_env=false", "--straggler_fraction=1.0",
         "--env_workers=2"]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "experiments.appworld_loop", *SMOKE, f"--run_dir={run_dir}",
            *extra]


def _clean(rec):
    """A log record without wall-clock and per-process compile counts."""
    return {k: v for k, v in rec.items()
            if k != "time" and not k.startswith(("time/", "compiles/"))}


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
    assert "eval/test_normal/tgc" in metrics[2] and "eval/test_normal/sgc" in metrics[10]
    # episodes.jsonl: every evaluation episode (3 tasks before, during at 2/4/6/8, after) and the
    # first rollout of each of an iteration's 6 tasks, with its turns and unit tests
    eps = _episodes(run_dir)
    counts = collections.Counter((e["tag"], e["iteration"]) for e in eps)
    assert counts == {("before LOOP", 0): 3, ("after LOOP", 10): 3,
                      **{("during", i): 3 for i in (2, 4, 6, 8)},
                      **{("train", i): 6 for i in range(1, 11)}}, counts
    for e in eps:
        assert e["turns"] and set(e["turns"][0]) == {"assistant", "code", "output"}
        assert len(e["passes"]) + len(e["failures"]) > 0 and e["end_reason"]
    train = [e for e in eps if e["tag"] == "train"]
    assert all(len({e["group"] for e in train if e["iteration"] == i}) == 6 for i in range(1, 11))
    # Read back, the file's episodes give the evaluation's own TGC, reward and behaviour measures.
    (after,) = [p for p in episodes.phases(os.path.join(run_dir, episodes.FILE), "miniworld-tiny")
                if p["tag"] == "after LOOP"]
    logged = {k.split("/")[-1]: v for k, v in metrics[10].items()
              if k.startswith("eval/test_normal/") and not k.endswith(("num_tasks", "sgc",
                                                                        "num_scenarios"))}
    assert after["episodes"] == 3 and set(logged) == set(after) - {"tag", "iteration", "split",
                                                                    "episodes"}
    for k, v in logged.items():
        assert after[k] == pytest.approx(v), k


def test_fresh_run_in_an_old_folder_sets_its_checkpoints_aside(reference_run, tmp_path):
    run_dir = str(tmp_path / "again")
    shutil.copytree(reference_run[0], run_dir)  # holds checkpoints 0-10 of a 10-iteration run
    # 3 iterations saving every 2nd (and the last): checkpoints 0 (before LOOP), 2 and 3 only.
    proc = subprocess.run(_cmd(run_dir, "--iterations=3", "--checkpoint_every=2",
                               "--keep_checkpoints=5", "--sft_steps=1"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["0", "2", "3"]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints.previous"))) == sorted(
        str(i) for i in range(11))
    assert sorted(_metrics(run_dir)) == [0, 1, 2, 3]


def test_compiles_stay_bounded(reference_run):
    run_dir, *_ = reference_run
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
        buckets = json.load(f)["train"]["epochs"]["buckets"]
    # One update-step program per (bucket length, packed row count: a quarter of the minibatch at
    # most 4) at most, however many steps ran; at least one, since this run takes update steps
    # (test_loop_takes_update_steps_on_real_rewards).
    bound = 4 * len(buckets)
    assert 1 <= summary["compiles"]["update"] <= bound
    # The sampler compiles per (row bucket, length bucket), log-bounded; 3 iterations + 3 evals
    # with different prompt lengths must not have compiled per call.
    assert sum(summary["compiles"]["sampler"].values()) <= 40
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        counts = [json.loads(line).get("compiles/update") for line in f]
    counts = [c for c in counts if c is not None]
    assert counts == sorted(counts) and 1 <= counts[-1] <= bound


def _moved(before, after) -> bool:
    return any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def test_loop_takes_update_steps_on_real_rewards(reference_run):
    """Some task's rollouts earned different miniworld rewards, so LOOP kept rollouts with
    |A| >= 0.01 and took update steps; each iteration's steps show in the step and skip counters
    of its checkpoint, and the params move exactly in the iterations that applied a step."""
    run_dir, *_ = reference_run
    metrics = _metrics(run_dir)
    steps = {it: metrics[it]["update/steps"] for it in range(1, 11)}
    assert sum(steps.values()) > 0, [metrics[it]["adv/filtered_share"] for it in steps]
    for it, n in steps.items():
        if n:
            assert metrics[it]["adv/abs_mean"] > 0 and metrics[it]["adv/filtered_share"] < 1, it
    states = [_trained(run_dir, it) for it in range(11)]  # --keep_checkpoints=11: all of them
    for it in steps:
        before, after = states[it - 1], states[it]
        applied = int(after["step"]) - int(before["step"])
        skipped = sum(int(after[k]) - int(before[k]) for k in ("nan_skips", "outlier_skips"))
        assert applied + skipped == steps[it], (it, applied, skipped)
        assert _moved(before["trainable"], after["trainable"]) == (applied > 0), it
    assert int(states[10]["step"]) > 0


def _checkpoints(run_dir):
    """Complete checkpoint steps in a run folder (orbax renames a finished save to its step)."""
    folder = os.path.join(run_dir, "checkpoints")
    return (sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder)
            else [])


def _trained(run_dir, step):
    """The TrainState arrays a checkpoint holds, as NumPy."""
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(os.path.join(run_dir, "checkpoints", str(step), "state"))
    return jax.tree.map(np.asarray, tree)


def _episodes(run_dir):
    return list(episodes.read(os.path.join(run_dir, episodes.FILE)))


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
    assert _episodes(run_dir) == _episodes(ref_dir)  # each episode once, as uninterrupted
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


# ----------------------------------------------------------------------------- RFT, A > 0 only


@pytest.fixture(scope="module")
def trained_policy(reference_run, tmp_path_factory):
    """The smoke run's final policy as a Hugging Face folder (weights and its tokenizer): a model
    that already solves some tasks, which the RFT warm start needs (a random one solves none)."""
    from loopjax.models.config import ModelConfig  # noqa: PLC0415
    from loopjax.models.hf_io import save_hf_checkpoint  # noqa: PLC0415
    run_dir, *_ = reference_run
    out = str(tmp_path_factory.mktemp("policy"))
    with open(os.path.join(run_dir, "model_config.json")) as f:
        fields = json.load(f)
    # Written as a llama config.json: a qwen2 one means q/k/v biases to Hugging Face loaders
    # (loopjax's too), which the from-scratch model does not have; the math is the same.
    model_config = dataclasses.replace(ModelConfig(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}), family="llama")
    params = _trained(run_dir, 10)["trainable"]
    save_hf_checkpoint(out, model_config, params)
    tok_dir = os.path.join(run_dir, "tokenizer")
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), out)
    return out, params


@pytest.fixture(scope="module")
def rft_positive_run(trained_policy, tmp_path_factory):
    """From the trained policy: the RFT warm start (one round of K rollouts per train task, a few
    fine-tuning steps on the successes), then LOOP updating on A > 0 rollouts only, observed by
    tests/recording_worker.py (what the fine-tuning and each iteration's epoch driver were
    given)."""
    run_dir = str(tmp_path_factory.mktemp("rft"))
    out = os.path.join(run_dir, "recorded.json")
    cmd = [sys.executable, os.path.join(ROOT, "tests", "recording_worker.py"), out, *SMOKE,
           f"--run_dir={run_dir}", f"--model={trained_policy[0]}", "--warm_start=rft",
           "--rft_rounds=1", "--sft_steps=10", "--update.adv_positive_only=true",
           "--iterations=3", "--eval_every=0", "--keep_checkpoints=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        seen = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)["train"]
    return run_dir, seen, config


def test_rft_warm_start_trains_on_its_own_successes(trained_policy, rft_positive_run):
    from loopjax.envs import list_tasks  # noqa: PLC0415
    run_dir, seen, config = rft_positive_run
    (sft,) = seen["sft"]  # one warm start, none of it on demonstrations
    sampled = len(list_tasks(config["env"], config["train_split"])) * config["rollouts_per_task"]
    records = sft["records"]
    assert 0 < len(records) < sampled, (len(records), sampled)  # some solved, not every one
    assert all(r["success"] and r["reward"] == 1.0 for r in records)
    # Checkpoint 0 is the warm-started policy: the fine-tuning changed the loaded weights.
    assert _moved(trained_policy[1], _trained(run_dir, 0)["trainable"])


def test_adv_positive_only_updates_on_positive_advantages_only(rft_positive_run):
    """Each epoch of each iteration updates on exactly the rollouts with A >= adv_min_abs (all of
    them positive), while rollouts with A < 0 were there to be dropped; the advantages are the
    leave-one-out ones of the rollouts' miniworld rewards."""
    _, seen, config = rft_positive_run
    epochs = config["epochs"]["epochs_per_iteration"]
    min_abs = config["update"]["adv_min_abs"]
    assert len(seen["iterations"]) == config["iterations"]
    negative = kept = 0
    for it in seen["iterations"]:
        rewards, groups, adv = (np.array(it[k]) for k in ("rewards", "groups", "adv"))
        for g in np.unique(groups):  # a task left with one rollout (env failure) has A = 0
            r, n = rewards[groups == g], np.sum(groups == g)
            want = n / (n - 1) * (r - r.mean()) if n > 1 else np.zeros(1)
            np.testing.assert_allclose(adv[groups == g], want, atol=1e-6)
        positive = int(np.sum(adv >= min_abs))
        negative += int(np.sum(adv <= -min_abs))
        updated = sum(it["num_rollouts"])
        kept += updated
        if it["stopped_on_kl"]:  # the KL stop may end an iteration before its last epoch
            assert updated <= epochs * positive
        else:
            assert updated == epochs * positive, (updated, positive, adv)
    assert kept > 0 and negative > 0, (kept, negative)
