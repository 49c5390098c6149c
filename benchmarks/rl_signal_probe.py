"""How much signal does LOOP get from a warm-started policy? One JSON line after the warm start.

    python benchmarks/rl_signal_probe.py                        # the embedded default's warm start
    python benchmarks/rl_signal_probe.py -- --sft_steps=450 --seed=1

Runs the main job's warm start (same code path and options as
`python -m experiments.appworld_loop`), then samples K rollouts per task at the training temperature
on a slice of the train split and on dev, and prints, per split: greedy TGC (dev only), sampled
pass@1, pass@K, the share of tasks whose K rewards are not all equal (only those carry a
leave-one-out advantage) and the mean reward. LOOP can only improve greedy held-out success where
sampled rollouts sometimes succeed: pass@K well above greedy TGC on held-out tasks is its headroom;
a train pass@K far above dev's means the warm start memorized train tasks rather than learned a
skill that transfers.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.appworld_loop import resolve  # noqa: E402
from loopjax import eval as evaluation  # noqa: E402
from loopjax import train  # noqa: E402
from loopjax.envs import list_tasks  # noqa: E402


def probe(trainer, split: str, every: int, K: int, key) -> dict:
    tasks = list_tasks(trainer.config.env, split)[::every]
    records, _ = train.rollouts(trainer, [t for t in tasks for _ in range(K)],
                                [g for g in range(len(tasks)) for _ in range(K)],
                                limits=trainer.limits_train, key=key,
                                temperature=trainer.config.temperature, desc=f"probe {split}",
                                straggler=False)
    success_GxK = np.array([r.success for r in records]).reshape(len(tasks), K)
    reward_GxK = np.array([r.reward for r in records]).reshape(len(tasks), K)
    return {"tasks": len(tasks), "pass@1": float(success_GxK.mean()),
            f"pass@{K}": float(success_GxK.any(1).mean()),
            "mixed_reward_share": float((reward_GxK.std(1) > 0.01).mean()),
            "reward": float(reward_GxK.mean()), **evaluation.behaviour(records, trainer.config.env)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run_dir", default="runs/rl_signal_probe")
    parser.add_argument("--train_every", type=int, default=14, help="probe every n-th train task")
    parser.add_argument("overrides", nargs="*", help="extra --key=value options after --")
    args = parser.parse_args()
    config = resolve([f"--run_dir={args.run_dir}", "--iterations=0", *args.overrides])
    t0 = time.perf_counter()
    trainer = train.setup(config)
    train.warm_start(trainer)
    K = config.rollouts_per_task
    out = {"benchmark": "rl_signal_probe", "sft_steps": config.sft_steps, "seed": config.seed,
           "demo_careful": config.demo_careful,
           "dev_greedy": train.evaluate(trainer, "dev", "probe", 0)}
    for i, (split, every) in enumerate((("train", args.train_every), ("dev", 1))):
        out[split] = probe(trainer, split, every, K, jax.random.fold_in(trainer.key, 50 + i))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    for env in trainer.envs:
        env.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
