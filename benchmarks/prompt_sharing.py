"""The sampler's prefix cache (prompt pages common to episodes computed once): ONE JSON line.

    python benchmarks/prompt_sharing.py    # needs a finished default run (runs/miniworld-tiny)
    python benchmarks/prompt_sharing.py --run_dir runs/x -- --compact_prompt=false \
        --max_seq_len=4096

Restores the run's last checkpoint and collects one iteration of its G x K training rollouts
(the main job's code path: loopjax.train.rollouts) with `--sampler.share_prompts` off and on,
`--repeats` times each in alternation after one warm-up collection each (which compiles).
Reports the prompt tokens prefilled and mapped from the prefix cache per iteration, the median
collection seconds of each, and whether both produced the same episodes (tokens equal; log-probs
to 1e-5).
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loopjax import train  # noqa: E402
from packing import restored_trainer  # noqa: E402  (benchmarks/, this script's folder)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run_dir", default="runs/miniworld-tiny")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra --key=value options after --")
    args = parser.parse_args()
    config, trainer = restored_trainer(args.run_dir, args.overrides)
    G, K = config.tasks_per_iteration, config.rollouts_per_task
    rng = np.random.default_rng(0)
    tasks = [trainer.train_tasks[i] for i in rng.choice(len(trainer.train_tasks), G)]

    def collect(share: bool):
        trainer.engine.share_prompts = share
        t0 = time.perf_counter()
        records, stats = train.rollouts(trainer, [t for t in tasks for _ in range(K)],
                                        [g for g in range(G) for _ in range(K)],
                                        limits=trainer.limits_train, key=jax.random.key(0),
                                        temperature=config.temperature, desc=f"share={share}",
                                        straggler=False)
        return records, stats, time.perf_counter() - t0

    runs = {False: [], True: []}
    for share in (False, True):  # warm-up: compiles every shape either way meets
        collect(share)
    for _ in range(args.repeats):
        for share in (False, True):
            runs[share].append(collect(share))
    (plain, _, _), (shared, stats, _) = runs[False][0], runs[True][0]
    same_tokens = all(np.array_equal(a.tokens, b.tokens)
                      for a, b in zip(plain, shared, strict=True))
    logp_diff = max(float(np.max(np.abs(a.logp - b.logp), initial=0.0))
                    for a, b in zip(plain, shared, strict=True) if len(a.logp) == len(b.logp))
    out = {"benchmark": "prompt_sharing", "run_dir": args.run_dir, "tasks": G,
           "rollouts_per_task": K, "episodes": len(plain),
           "mean_prompt_len": float(np.mean([np.argmax(r.is_output) for r in plain])),
           "prefill_tokens": {"unshared": runs[False][0][1].prefill_tokens,
                              "shared": stats.prefill_tokens,
                              "mapped": stats.prefill_shared_tokens},
           "collect_s": {"unshared": round(statistics.median(r[2] for r in runs[False]), 2),
                         "shared": round(statistics.median(r[2] for r in runs[True]), 2)},
           "same_tokens": same_tokens, "max_logp_diff": logp_diff}
    out["prefill_token_ratio"] = round(out["prefill_tokens"]["unshared"]
                                       / max(out["prefill_tokens"]["shared"], 1), 2)
    out["collect_speedup"] = round(out["collect_s"]["unshared"] / max(out["collect_s"]["shared"],
                                                                      1e-9), 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
