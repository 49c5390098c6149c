"""The LOOP update on real rollouts, three ways: ONE JSON line.

    python benchmarks/packing.py    # needs a finished default run (runs/miniworld-tiny)
    python benchmarks/packing.py --run_dir runs/x --iterations 3
    python benchmarks/packing.py --keep_all -- --compact_prompt=false --max_seq_len=4096 \
        --max_obs_tokens=512 --epochs.buckets=4096,8192     # the full ReAct prompt, K = 6

Restores the run's last checkpoint, samples `--iterations` iterations of the run's G x K rollouts
with its policy (the same code path as `python -m experiments.appworld_loop`), and times the
epochs of LOOP updates over each iteration's rollouts from the same state: one rollout per row
(`--epochs.pack=false`), several packed per row (`--epochs.pack=true`, the default), and packed
with each task's prompt held once per microbatch (`--epochs.share_prefix=true`: a tree row, whole
tasks per minibatch). All run in this process on the same rollouts, each in two passes over all
iterations: the first compiles every (rows, T) shape it meets, the second reuses them (a long
run's steady state). Reports both passes' update seconds, the programs compiled, the forward
tokens (rows x T) per step and the tokens held in them (not padding). Options after `--` go to
the run's config (a different prompt, K, bucket).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.appworld_loop import resolve  # noqa: E402
from loopjax import train  # noqa: E402
from loopjax.loop import advantages  # noqa: E402
from loopjax.loop.epochs import run_iteration  # noqa: E402


def restored_trainer(run_dir: str, overrides):
    """The main job's RunState for `run_dir` with its newest checkpoint restored."""
    config = resolve([f"--run_dir={run_dir}", "--resume", *overrides])
    trainer = train.setup(config)
    if train.restore(trainer) is None:
        raise SystemExit(f"no checkpoint in {run_dir}/checkpoints: run "
                         "`python -m experiments.appworld_loop` first")
    return config, trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run_dir", default="runs/miniworld-tiny")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--keep_all", action="store_true",
                        help="advantages +-1 (alternating in each task) instead of the rewards' "
                             "leave-one-out ones, so that no rollout is filtered: the learner's "
                             "cost on every rollout, whatever the policy scores")
    parser.add_argument("overrides", nargs="*", help="extra --key=value options after --")
    args = parser.parse_args()
    config, trainer = restored_trainer(args.run_dir, args.overrides)
    G, K = config.tasks_per_iteration, config.rollouts_per_task
    rng = np.random.default_rng(0)
    work = []
    for it in range(args.iterations):
        tasks = [trainer.train_tasks[i] for i in rng.choice(len(trainer.train_tasks), G)]
        records, _ = train.rollouts(trainer, [t for t in tasks for _ in range(K)],
                                    [g for g in range(G) for _ in range(K)],
                                    limits=trainer.limits_train, key=jax.random.key(it),
                                    temperature=config.temperature, desc=f"rollouts {it}",
                                    straggler=False)  # all G x K, in order
        rewards = np.array([r.reward for r in records], np.float32).reshape(G, K)
        adv = np.asarray(advantages(rewards, config.update.baseline,
                                    config.update.normalize_std)).reshape(-1)
        if args.keep_all:
            adv = np.where(np.arange(G * K) % 2 == 0, 1.0, -1.0).astype(np.float32)
        work.append((records, adv))
    lengths = [len(r.tokens) for records, _ in work for r in records]

    saved = jax.device_get(trainer.state.replace(base=None))
    out = {"benchmark": "packing", "run_dir": args.run_dir, "keep_all": args.keep_all,
           "buckets": list(config.epochs.buckets), "rollouts": len(lengths),
           "mean_len": float(np.mean(lengths)), "max_len": int(np.max(lengths)),
           "mean_prompt_len": float(np.mean([np.argmax(r.is_output) for records, _ in work
                                             for r in records])),
           "rollouts_per_task": K}
    for name, pack, share in (("one_per_row", False, False), ("packed", True, False),
                              ("shared_prefix", True, True)):
        epochs = dataclasses.replace(config.epochs, pack=pack, share_prefix=share)
        compiles0 = trainer.update_step.num_compiles()
        passes = []
        for _ in range(2):  # the first pass compiles every shape it meets; the second reuses them
            t_pass, steps, fwd_tokens, held = 0.0, 0, 0, 0
            for i, (records, adv) in enumerate(work):
                state = jax.device_put(saved, trainer.update_step.state_shardings)
                state = state.replace(base=trainer.state.base)
                t0 = time.perf_counter()
                state, history = run_iteration(trainer.update_step, state, records, adv,
                                               jax.random.key(100 + i), epochs)
                jax.block_until_ready(state.trainable)
                t_pass += time.perf_counter() - t0
                steps += len(history)
                fwd_tokens += sum(h["rows"] * h["T"] for h in history)
                held += sum(h["held_tokens"] for h in history)
            passes.append(t_pass)
        out[name] = {"first_pass_s": round(passes[0], 2), "second_pass_s": round(passes[1], 2),
                     "steps": steps, "compiles": trainer.update_step.num_compiles() - compiles0,
                     "forward_tokens_per_step": round(fwd_tokens / max(steps, 1)),
                     "held_tokens_per_step": round(held / max(steps, 1))}
    for a, b in (("one_per_row", "packed"), ("packed", "shared_prefix")):
        out[f"{b}_vs_{a}"] = {
            "forward_token_ratio": round(out[a]["forward_tokens_per_step"]
                                         / max(out[b]["forward_tokens_per_step"], 1), 2),
            "held_token_ratio": round(out[a]["held_tokens_per_step"]
                                      / max(out[b]["held_tokens_per_step"], 1), 2),
            "second_pass_speedup": round(out[a]["second_pass_s"]
                                         / max(out[b]["second_pass_s"], 1e-9), 2)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
