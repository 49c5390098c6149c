"""How much a warm start leaves LOOP to learn, measured before any RL.

    python -m experiments.headroom --preset appworld-smollm2 --sft_steps=50 --samples=4 \\
        --splits=train,dev --every=3 --out runs/headroom/sft50.json

Runs the preset's set-up and warm start (the main job's own functions, same seed, so the same
warm start a run of that preset starts from; with --init_from=RUN, that run's own warm start),
then on every `every`-th task of each split:
greedy TGC (the main job's evaluation) and `samples` rollouts per task at the training
temperature, whose pass@1 (share of rollouts that succeed), pass@K (share of tasks with a
success) and mixed share (tasks whose K rollouts have both a success and a failure: the only
tasks whose leave-one-out advantages are not all zero) say how much signal LOOP gets. Writes
one JSON object to --out and the episodes to episodes.jsonl in the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import jax
import numpy as np

from experiments.appworld_loop import resolve
from loopjax import episodes, train
from loopjax import eval as evaluation
from loopjax.envs import list_tasks

OWN = {"samples": 4, "splits": "train,dev", "every": 1, "out": ""}


def sampled(records, K: int) -> dict:
    """pass@1, pass@K and the mixed share of K rollouts per task (records grouped by .group)."""
    by_task: dict[int, list[bool]] = {}
    for r in records:
        by_task.setdefault(r.group, []).append(bool(r.success))
    wins = [np.mean(v) for v in by_task.values()]
    return {"pass@1": float(np.mean(wins)), f"pass@{K}": float(np.mean([w > 0 for w in wins])),
            "mixed_share": float(np.mean([0 < w < 1 for w in wins])), "tasks": len(by_task)}


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    own, rest, args = dict(OWN), [], list(argv)
    while args:  # this script's own options (--name=value or --name value); the rest: the job's
        a = args.pop(0)
        name = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        if name not in own:
            rest.append(a)
        elif "=" in a:
            own[name] = type(OWN[name])(a.split("=", 1)[1])
        elif args:
            own[name] = type(OWN[name])(args.pop(0))
        else:
            raise SystemExit(f"error: --{name} needs a value")
    K, every = own["samples"], own["every"]
    if K < 2 or every < 1:
        raise SystemExit("error: --samples must be >= 2 and --every >= 1")
    config = resolve(rest)
    name = os.path.basename(os.path.normpath(config.init_from)) if config.init_from else \
        f"sft{config.sft_steps}"
    run_dir = os.path.join(config.run_dir, f"headroom-{name}")
    config = dataclasses.replace(config, resume=False, run_dir=run_dir)
    t0 = time.perf_counter()
    rs = train.setup(config)
    with rs.timer("warm_start"):
        if config.init_from:  # the warm start of a run: the one its LOOP started from
            train.start_from(rs, config.init_from)
        else:
            train.warm_start(rs)
    out = {"preset_config": config.to_dict(), "samples": K, "every": every, "splits": {}}
    path = os.path.join(config.run_dir, episodes.FILE)
    if os.path.exists(path):
        os.remove(path)
    for split in own["splits"].split(","):
        tasks = list_tasks(config.env, split)[::every]
        greedy_records, _ = train.rollouts(
            rs, tasks, list(range(len(tasks))), limits=rs.limits_eval,
            key=jax.random.fold_in(rs.key, 7), temperature=train.EVAL_TEMPERATURE,
            desc=f"greedy {split}", straggler=False)
        episodes.write(path, greedy_records, config.env, split=split, tag="greedy", iteration=0)
        records, _ = train.rollouts(
            rs, [t for t in tasks for _ in range(K)],
            [g for g in range(len(tasks)) for _ in range(K)], limits=rs.limits_train,
            key=jax.random.fold_in(rs.key, 11), temperature=config.temperature,
            desc=f"sampled {split}", straggler=False)
        episodes.write(path, records, config.env, split=split, tag=f"sampled x{K}", iteration=0)
        out["splits"][split] = {"greedy": evaluation.summarize(greedy_records, config.env),
                                "sampled": sampled(records, K)}
        logging.info("%s: greedy TGC %.3f, %s", split, out["splits"][split]["greedy"]["tgc"],
                     out["splits"][split]["sampled"])
    out["wall_s"] = time.perf_counter() - t0
    target = own["out"] or os.path.join(config.run_dir, "headroom.json")
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    with open(target, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(json.dumps({s: {"greedy_tgc": v["greedy"]["tgc"], **v["sampled"]}
                      for s, v in out["splits"].items()}, indent=2))
    for env in rs.envs:
        env.close()
    return out


if __name__ == "__main__":
    main()
