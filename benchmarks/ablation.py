"""The paper's Table 1 on miniworld-tiny: LOOP variants, RLOO, GRPO, RFT, the warm start, and SFT
on careful demonstrations only, over seeds.

    python benchmarks/ablation.py                       # seeds 0 1 2, the default run per variant
    python benchmarks/ablation.py --seeds 1 --variants "LOOP (token)" RFT -- --iterations=8
    python benchmarks/ablation.py --seeds 0 1 2 --from_runs   # the table of the runs on disk

Per seed, every variant starts from the very same warm start, as in the paper: one run with
--iterations=0 trains the tokenizer, the SFT policy and evaluates it; each variant's run folder
then gets a copy of that run's tokenizer and step-0 checkpoint and continues it with --resume, so
the variants differ only in their update settings. Two rows are not LOOP runs: "warm start" is
that shared policy itself, and "careful SFT (no RL)" is a warm start on demonstrations of
careful agents only (--demo_careful=1.0), which no real user has. Prints the table (mean and
min-max over seeds of TGC on dev + test_normal, test_normal and test_challenge) and one JSON line.
`--from_runs` runs nothing: it tabulates the summary.json files already in --run_root (e.g. of
seeds run as separate processes, or of an ablation cut short), each row over the seeds it has.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import appworld_loop  # noqa: E402
from loopjax.eval import held_out_tgc  # noqa: E402

# name -> overrides (docs/algorithm.md's table of variants)
VARIANTS = {
    "LOOP (token)": [],
    "LOOP (turn)": ["--update.level=turn"],
    "LOOP (bandit)": ["--update.level=trajectory"],
    "LOOP RwNorm": ["--update.normalize_std=true"],
    "RLOO": ["--update.clip_form=none", "--epochs.epochs_per_iteration=1",
             "--update.minibatch_size=96"],
    "GRPO": ["--update.baseline=leave_none_out", "--update.normalize_std=true",
             "--epochs.epochs_per_iteration=1", "--update.minibatch_size=96"],
    "RFT": ["--update.baseline=rft"],
}


def _copy_warm_start(warm: str, run_dir: str) -> None:
    """run_dir := the warm-start run's tokenizer, model config and step-0 checkpoint only."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    for name in ("tokenizer", "model_config.json"):
        src = os.path.join(warm, name)
        if os.path.exists(src):  # absent with a --model checkpoint
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src,
                                                                     os.path.join(run_dir, name))
    shutil.copytree(os.path.join(warm, "checkpoints", "0"),
                    os.path.join(run_dir, "checkpoints", "0"))


def scores(summary: dict) -> dict:
    """TGC on the held-out splits (dev + test_normal, task-weighted), test_normal, test_challenge,
    and the dev behaviour measures (greedy): doc lookups per episode, paginates when needed."""
    return {"held_out": held_out_tgc(summary),
            "test_normal": summary["test_normal"]["tgc"],
            "test_challenge": summary["test_challenge"]["tgc"],
            "dev_doc_lookups": summary["dev"].get("doc_lookups", float("nan")),
            "dev_paging": summary["dev"].get("paginate_when_needed", float("nan"))}


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("(", "").replace(")", "")


def _from_runs(root: str, seeds, variants) -> dict[str, list[dict]]:
    """{row: [scores per seed that has it]} from the run folders' summary.json files."""
    def load(*parts):
        path = os.path.join(root, *parts, "summary.json")
        return json.load(open(path)) if os.path.exists(path) else None
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        found = [("warm start", load(f"seed{seed}", "warm_start"), "before")]
        found += [(name, load(f"seed{seed}", _slug(name)), "after") for name in variants]
        found += [("careful SFT (no RL)", load(f"seed{seed}", "careful_sft"), "before")]
        for name, summary, when in found:
            if summary is not None:
                rows.setdefault(name, []).append(dict(scores(summary[when]), seed=seed))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run_root", default="runs/ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--no_ceiling", action="store_true", help="skip the careful-SFT row")
    parser.add_argument("--from_runs", action="store_true",
                        help="run nothing; tabulate the run folders under --run_root")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {}
    if args.from_runs:
        rows = _from_runs(args.run_root, args.seeds, args.variants)
    for seed in [] if args.from_runs else args.seeds:
        root = os.path.join(args.run_root, f"seed{seed}")
        warm = os.path.join(root, "warm_start")
        before = appworld_loop.main([f"--seed={seed}", f"--run_dir={warm}", *args.overrides,
                                     "--iterations=0"])["before"]
        rows.setdefault("warm start", []).append(dict(scores(before), seed=seed))
        for name in args.variants:
            run_dir = os.path.join(root, _slug(name))
            _copy_warm_start(warm, run_dir)
            summary = appworld_loop.main([f"--seed={seed}", f"--run_dir={run_dir}",
                                          *VARIANTS[name], *args.overrides, "--resume"])
            assert summary["before"] == before, ("the variant did not start from the shared "
                                                 "warm start")
            rows.setdefault(name, []).append(dict(scores(summary["after"]), seed=seed))
        if not args.no_ceiling:
            ceiling = appworld_loop.main([f"--seed={seed}", f"--run_dir={root}/careful_sft",
                                          *args.overrides, "--demo_careful=1.0", "--iterations=0"])
            rows.setdefault("careful SFT (no RL)", []).append(dict(scores(ceiling["before"]),
                                                                       seed=seed))
    table = {name: {k: {"mean": float(np.mean([r[k] for r in rs])),
                        "min": float(np.min([r[k] for r in rs])),
                        "max": float(np.max([r[k] for r in rs])),
                        "per_seed": [r[k] for r in rs]} for k in rs[0] if k != "seed"}
             for name, rs in rows.items()}
    for name, rs in rows.items():
        table[name]["seeds"] = [r["seed"] for r in rs]

    def cell(v):
        return f"{100 * v['mean']:5.1f} ({100 * v['min']:4.1f}-{100 * v['max']:5.1f})"
    print(f"\nTGC in %, mean (min-max) over seeds {args.seeds}")
    print(f"{'method':22s} | {'dev + test_normal':19s} | {'test_normal':19s} | "
          f"{'test_challenge':19s} | dev lookups | dev paging | seeds")
    for name, r in table.items():
        print(f"{name:22s} | {cell(r['held_out']):19s} | {cell(r['test_normal']):19s} | "
              f"{cell(r['test_challenge']):19s} | {r['dev_doc_lookups']['mean']:11.2f} | "
              f"{r['dev_paging']['mean']:10.2f} | {r['seeds']}")
    print(json.dumps({"benchmark": "ablation", "seeds": args.seeds, "table": table}))


if __name__ == "__main__":
    main()
