"""The paper's Table 1 on miniworld-tiny: LOOP (token / turn / bandit), RLOO, GRPO.

    python benchmarks/ablation.py                       # one seed, the default run per variant
    python benchmarks/ablation.py --seed 1 -- --iterations=8

Every variant starts from the very same warm start, as in the paper: one run with
--iterations=0 trains the tokenizer, the SFT policy and evaluates it; each variant's run folder
then gets a copy of that run's tokenizer and step-0 checkpoint and continues it with --resume, so
the variants differ only in their update settings. Prints the table and one JSON line with
TGC/SGC on test_normal and test_challenge per variant.
"""

import argparse
import json
import os
import shutil
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


def _copy_warm_start(warm: str, run_dir: str) -> None:
    """run_dir := the warm-start run's tokenizer, model config and step-0 checkpoint only."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    for name in ("tokenizer", "model_config.json"):
        src = os.path.join(warm, name)
        if os.path.exists(src):  # absent with a --model checkpoint
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(run_dir, name))
    shutil.copytree(os.path.join(warm, "checkpoints", "0"), os.path.join(run_dir, "checkpoints", "0"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run_root", default="runs/ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = {}
    warm = os.path.join(args.run_root, "warm_start")
    before = appworld_loop.main([f"--seed={args.seed}", f"--run_dir={warm}", *args.overrides,
                                 "--iterations=0"])["before"]
    for name in args.variants:
        slug = name.lower().replace(" ", "_").replace("(", "").replace(")", "")
        run_dir = os.path.join(args.run_root, slug)
        _copy_warm_start(warm, run_dir)
        summary = appworld_loop.main([f"--seed={args.seed}", f"--run_dir={run_dir}",
                                      *VARIANTS[name], *args.overrides, "--resume"])
        assert summary["before"] == before, "the variant did not start from the shared warm start"
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
