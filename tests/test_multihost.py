"""Multi-host training matches one host.

Two JAX processes on this machine (CPU, 2 devices each, jax.distributed over localhost, gloo
collectives) run LOOP on miniworld-tiny with mesh data=2 (one per process) x fsdp=2; one process
with 4 devices runs the same job on the same mesh shape. Their orbax checkpoints must agree, and
so must a 2-process run resumed from its checkpoint. The jobs run tests/multihost_worker.py (the
main job with a token-based reward, so that every iteration takes update steps).

Why not bit for bit: each process samples its episodes on its own 2 devices, in batches of its 4
episodes instead of all 8, and XLA's CPU matmuls round the behaviour log-probs of a different
batch shape differently in the last bit (~5e-7). The sampled tokens, rewards and advantages are
identical; the log-probs enter the PPO ratios, so parameters differ by ~1e-7 after 6-8 steps.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from loopjax.multihost import host_data_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
# A 1-layer model, 4 tasks x 2 rollouts of at most 2 short turns, no warm start, 1-task
# evaluations; overlap off and no straggler cut so that batches do not depend on timing.
TINY = ["--scratch.hidden_size=32", "--scratch.num_layers=1", "--scratch.intermediate_size=64",
        "--scratch.head_dim=16", "--train_split=test_challenge", "--tasks_per_iteration=4",
        "--rollouts_per_task=2", "--warm_start=none", "--max_eval_tasks=1",
        "--final_splits=test_challenge", "--update.minibatch_size=4", "--eval_every=0",
        "--overlap_env=false", "--straggler_fraction=1.0", "--straggler_task_fraction=1.0",
        "--env_workers=2", "--mesh=2,2,1", "--max_interactions_train=2",
        "--max_interactions_eval=1", "--max_new_tokens=32", "--max_seq_len=384",
        "--epochs.buckets=384", "--keep_checkpoints=5"]
RTOL = 1e-5  # of each array's largest magnitude


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir, processes: int, devices: int, *extra):
    """The job as `processes` JAX processes of `devices` CPU devices each; [(Popen, log path)]."""
    port, procs = _free_port(), []
    for p in range(processes):
        # XLA's CPU backend at optimization level 0 compiles twice as fast; both sides use it.
        # No persistent compile cache: these programs span several CPU devices (conftest.py).
        env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
                   JAX_ENABLE_COMPILATION_CACHE="false",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                             "--xla_backend_optimization_level=0",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        args = [sys.executable, WORKER, *TINY, f"--run_dir={run_dir}", *extra]
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",  # not [::]: no IPv6 needed
                       JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(p))
            args.append("--multihost")
        log = f"{run_dir}.{len(extra)}.process{p}.log"
        with open(log, "w") as f:  # a file, not a pipe: nobody reads the pipe while they run
            procs.append((subprocess.Popen(args, cwd=ROOT, env=env, stdout=f,
                                           stderr=subprocess.STDOUT), log))
    return procs


def _kill(procs):
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait(procs, timeout=600) -> list[str]:
    """Waits for all processes; once one fails (or time is up) the rest are killed rather than
    left waiting in a collective. Returns their logs."""
    deadline = time.monotonic() + timeout
    try:
        while any(proc.poll() is None for proc, _ in procs) and time.monotonic() < deadline:
            if any(proc.poll() not in (None, 0) for proc, _ in procs):
                break
            time.sleep(0.2)
    finally:
        _kill(procs)
    logs = [open(path).read() for _, path in procs]
    failed = [f"{path} (exit {proc.returncode}):\n{log[-3000:]}"
              for (proc, path), log in zip(procs, logs, strict=True) if proc.returncode != 0]
    assert not failed, "\n\n".join(failed)
    return logs


def _checkpoint(run_dir, step):
    """The saved TrainState (trained part) of one checkpoint, as NumPy arrays."""
    path = os.path.join(run_dir, "checkpoints", str(step), "state")
    ckpt = ocp.PyTreeCheckpointer()
    tree = ckpt.metadata(path).item_metadata.tree
    return ckpt.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def _max_diff(a, b) -> dict:
    """Per leaf: (max |a - b|, max |a|)."""
    return {jax.tree_util.keystr(path): (float(np.max(np.abs(x - y), initial=0.0)),
                                         float(np.max(np.abs(x), initial=0.0)))
            for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                                    strict=True)}


def _train_metrics(run_dir) -> dict:
    """The iterations' logged metrics by step (no times, compile counts or evaluations)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "train/reward" in rec:
                assert rec["step"] not in out, f"step {rec['step']} logged twice"
                out[rec["step"]] = {k: v for k, v in rec.items()
                                    if k.startswith(("train/", "adv/", "update/"))}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single process, 3 iterations; 2 processes, 2 iterations, then resumed to 3."""
    ref, multi = (str(tmp_path_factory.mktemp(n) / "run") for n in ("one_process", "two"))
    started = time.monotonic()
    ref_proc = _launch(ref, 1, 4, "--iterations=3")  # runs alongside the first 2-process run
    try:
        multi_logs = _wait(_launch(multi, 2, 2, "--iterations=2"))
    except BaseException:
        _kill(ref_proc)
        raise
    _wait(ref_proc)
    two_iterations = {step: _checkpoint(multi, step) for step in (0, 2)}
    resumed_logs = _wait(_launch(multi, 2, 2, "--iterations=3", "--resume"))
    print(f"multi-host test runs: {time.monotonic() - started:.0f} s")
    return ref, multi, two_iterations, multi_logs + resumed_logs


def test_two_processes_train_the_same_params_as_one(runs):
    ref, multi, two_iterations, _ = runs
    start = _checkpoint(ref, 0)
    for step, got in [*two_iterations.items(), (3, _checkpoint(multi, 3))]:
        want = _checkpoint(ref, step)
        assert int(got["step"]) == int(want["step"]), step  # the same number of optimizer steps
        diffs = _max_diff(want, got)
        print(step, "max |diff| of params:",
              max(d for k, (d, _) in diffs.items() if "trainable" in k))
        for name, (diff, scale) in diffs.items():
            assert diff <= RTOL * scale, (step, name, diff, scale)
    # Not vacuous: training moved the params far more than the two runs differ.
    moved = _max_diff(start["trainable"], _checkpoint(ref, 3)["trainable"])
    assert int(_checkpoint(ref, 3)["step"]) >= 6
    assert max(d for d, _ in moved.values()) > 1e-4


def test_two_processes_log_the_same_iterations(runs):
    ref, multi, _, logs = runs
    want, got = _train_metrics(ref), _train_metrics(multi)  # written once: by process 0 only
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:
        assert got[step].keys() == want[step].keys()
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)
        assert got[step]["update/steps"] > 0, step
    # Every sampler call of every process ran on a zero-copy host-local view of the params.
    for log in logs:
        checked = [int(line.split(":")[1]) for line in log.splitlines()
                   if line.startswith("local views checked:")]
        assert checked and checked[0] >= 2, log[-2000:]


# LoRA (rank 4 on every projection) after a 4-step SFT warm start on the scripted agents'
# demonstrations, whose 4 rows split over the 4 data-parallel devices.
# The warm start's AdamW divides each gradient entry by its own magnitude, and in this tiny random
# model some entries of the q_proj and k_proj adapters' B gradients are at float-rounding level
# (near-uniform attention): there the two runs' last-bit differences become 1.1e-4 of the leaf's
# scale (measured, every other leaf <= 2.5e-6). Training on another process's demonstrations, or on
# half of them, differs at order 1.
RTOL_SFT = 1e-3
LORA_SFT = ["--update.train_full_weights=false", "--update.lora.rank=4", "--warm_start=sft",
            "--sft_steps=4", "--sft_rows=4", "--sft_learning_rate=1e-2", "--iterations=2"]


@pytest.fixture(scope="module")
def lora_sft_runs(tmp_path_factory):
    """One process and two processes, each LoRA after an SFT warm start, 2 iterations."""
    ref, multi = (str(tmp_path_factory.mktemp(n) / "run") for n in ("one_lora", "two_lora"))
    ref_proc = _launch(ref, 1, 4, *LORA_SFT)
    try:
        logs = _wait(_launch(multi, 2, 2, *LORA_SFT))
    except BaseException:
        _kill(ref_proc)
        raise
    return ref, multi, logs + _wait(ref_proc)


def test_two_processes_train_the_same_lora_after_sft(lora_sft_runs):
    ref, multi, logs = lora_sft_runs
    for log in logs:  # every process ran the warm start and LOOP on the adapter
        assert "warm start (sft)" in log and "sft step 3 loss" in log, log[-2000:]
    for step in (0, 2):  # 0: the warm start's result; 2: after two LOOP iterations
        want, got = _checkpoint(ref, step), _checkpoint(multi, step)
        assert int(got["step"]) == int(want["step"]), step
        for name, (diff, scale) in _max_diff(want, got).items():
            assert diff <= RTOL_SFT * scale, (step, name, diff, scale)
    assert int(_checkpoint(ref, 2)["step"]) >= 2
    # Not vacuous: the adapter alone is trained (no embedding in it), the warm start made its B
    # non-zero (LoRA starts at B = 0) and LOOP moved it again.
    names = list(_max_diff(_checkpoint(ref, 0)["trainable"], _checkpoint(ref, 0)["trainable"]))
    assert not any("embed" in n for n in names), names[:5]
    assert max(np.max(np.abs(x)) for n, x in jax.tree_util.tree_leaves_with_path(
        _checkpoint(ref, 0)["trainable"]) if "'b'" in jax.tree_util.keystr(n)) > 1e-3
    moved = _max_diff(_checkpoint(ref, 0)["trainable"], _checkpoint(ref, 2)["trainable"])
    assert max(d for d, _ in moved.values()) > 1e-4
    want, got = _train_metrics(ref), _train_metrics(multi)
    assert sorted(got) == sorted(want) == [1, 2]
    for step in want:
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)


def test_mesh_must_keep_fsdp_and_tensor_inside_a_host():
    # 2 hosts x 2 devices; the process owning each device, rows = "data" indices.
    assert host_data_rows(np.array([[0, 0], [1, 1]]), 1, 2, {}).tolist() == [1]
    assert host_data_rows(np.array([[0], [0], [1], [1]]), 0, 2, {}).tolist() == [0, 1]
    with pytest.raises(ValueError, match="--mesh 2,-1,1"):
        host_data_rows(np.array([[0, 0, 1, 1]]), 0, 2, {"data": 1, "fsdp": 4, "tensor": 1})
    with pytest.raises(ValueError, match="contiguous"):
        host_data_rows(np.array([[0], [1], [0], [1]]), 0, 2, {"data": 4, "fsdp": 1, "tensor": 1})
