"""Does LOOP improve held-out success on miniworld-tiny over the warm start? Mean over seeds.

    python benchmarks/miniworld_learning.py                 # seeds 0 1 2, the embedded default
    python benchmarks/miniworld_learning.py --seeds 3 4 -- --iterations=16

Runs the main job once per seed (the same code path as `python -m experiments.appworld_loop`),
and prints one JSON line: per seed and mean, held-out TGC/SGC/reward before LOOP (= after the
SFT warm start) and after LOOP, the improvement in points and the behaviour measures on dev. The
peer is the warm-start policy itself, evaluated in the same run on the same tasks
(benchmarks/ablation.py adds RFT and the careful-SFT ceiling).
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import appworld_loop  # noqa: E402
from loopjax.eval import HELD_OUT, held_out_tgc  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run_root", default="runs/learning")
    parser.add_argument("overrides", nargs="*", help="extra --key=value options after --")
    args = parser.parse_args()
    per_seed = []
    for seed in args.seeds:
        summary = appworld_loop.main([f"--seed={seed}", f"--run_dir={args.run_root}/seed{seed}",
                                      *args.overrides])
        row = {"seed": seed, "wall_s": round(summary["wall_s"], 1)}
        for when in ("before", "after"):
            for split in summary[when]:
                for k in ("tgc", "sgc", "reward"):
                    row[f"{when}/{split}/{k}"] = summary[when][split][k]
        for when in ("before", "after"):  # task-weighted held-out success (dev + test_normal)
            row[f"{when}/held_out_success"] = held_out_tgc(summary[when])
        row["improvement_points"] = 100 * (row["after/held_out_success"]
                                           - row["before/held_out_success"])
        for when in ("before", "after"):  # the behaviour measures on dev (loopjax.eval.behaviour)
            for k in ("doc_lookups", "paginate_when_needed", "answered_without_lookup",
                      "code_error_rate", "turns"):
                if k in summary[when]["dev"]:
                    row[f"{when}/dev/{k}"] = summary[when]["dev"][k]
        per_seed.append(row)
        print(f"seed {seed}: held-out TGC {100 * row['before/held_out_success']:.1f}% -> "
              f"{100 * row['after/held_out_success']:.1f}% "
              f"({row['improvement_points']:+.1f} points, "
              f"{row['wall_s']:.0f} s)", flush=True)
    mean = {k: float(np.mean([r[k] for r in per_seed if k in r]))
            for k in per_seed[0] if k != "seed"}
    print(json.dumps({"benchmark": "miniworld_learning", "held_out": HELD_OUT, "seeds": args.seeds,
                      "mean": mean, "every_seed_improves": all(r["improvement_points"] > 0
                                                               for r in per_seed),
                      "per_seed": per_seed}))


if __name__ == "__main__":
    main()
