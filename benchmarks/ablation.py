"""The paper's Table 1 on miniworld-tiny: LOOP (token / turn / bandit), RLOO, GRPO.

    python benchmarks/ablation.py                       # one seed, the default run per variant
    python benchmarks/ablation.py --seed 1 -- --iterations=8

Every variant starts from the same warm start (same seed: same tokenizer, SFT and evaluation
before LOOP) and differs only in its update settings, as in the paper. Prints the table and one
JSON line with TGC/SGC on test_normal and test_challenge per variant.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import appworld_loop  # noqa: E402

# name -> overrides (ALGORITHM.md's table of variants)
VARIANTS = {
    "LOOP (token)": [],
    "LOOP (turn)": ["--update.level=turn"],
    "LOOP (bandit)": ["--update.level=trajectory"],
    "RLOO": ["--update.clip_form=none", "--epochs.epochs_per_iteration=1",
             "--update.minibatch_size=96"],
    "GRPO": ["--baseline=leave_none_out", "--normalize_std=true", "--epochs.epochs_per_iteration=1",
             "--update.minibatch_size=96"],
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run_root", default="runs/ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = {}
    before = None
    for name in args.variants:
        slug = name.lower().replace(" ", "_").replace("(", "").replace(")", "")
        summary = appworld_loop.main([f"--seed={args.seed}", f"--run_dir={args.run_root}/{slug}",
                                      *VARIANTS[name], *args.overrides])
        before = summary["before"]
        rows[name] = {f"{split}/{k}": summary["after"][split][k]
                      for split in ("test_normal", "test_challenge") for k in ("tgc", "sgc")}
    rows["warm start (SFT)"] = {f"{split}/{k}": before[split][k]
                                for split in ("test_normal", "test_challenge") for k in ("tgc", "sgc")}
    print("\nmethod            | test-normal TGC | SGC   | test-challenge TGC | SGC")
    for name, r in rows.items():
        print(f"{name:17s} | {100 * r['test_normal/tgc']:15.1f} | {100 * r['test_normal/sgc']:5.1f} | "
              f"{100 * r['test_challenge/tgc']:18.1f} | {100 * r['test_challenge/sgc']:5.1f}")
    print(json.dumps({"benchmark": "ablation", "seed": args.seed, "table": rows}))


if __name__ == "__main__":
    main()
