"""A run's episodes as JSON lines anyone can read: episodes.jsonl beside trajectories.html.

    write(path, rollouts, world, split="dev", tag="before LOOP", iteration=0)
    for line in read(path): ...           # dicts, one per episode (a torn last line skipped)
    python -m loopjax.episodes runs/x/episodes.jsonl --world appworld-synth   # measures by phase

Every evaluation episode is written, and the first rollout of each training task of every
iteration (one per group: a sample of what LOOP trained on). A line holds where the episode
came from (split, tag, iteration, seed), the task and instruction, every turn (what the agent
wrote, the code run, the reply), the end reason, the unit tests passed and failed, the reward,
and the world's behaviour measures of that episode. A resumed run drops the lines past its
checkpoint, as metrics.jsonl does, so no episode is written twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

from loopjax.envs.base import EpisodeRecord, EvalResult, Turn
from loopjax.envs.registry import episode_behaviour
from loopjax.eval import episode_measures
from loopjax.metrics import read_jsonl, rewrite_jsonl
from loopjax.rollout.batch import Rollout

FILE = "episodes.jsonl"


def line(rollout: Rollout, world: str, *, split: str, tag: str, iteration: int) -> dict:
    """One episode as a JSON-ready dict."""
    ep = rollout.episode
    return {"split": split, "tag": tag, "iteration": iteration, "task_id": rollout.task_id,
            "group": rollout.group, "instruction": ep.instruction,
            "success": bool(rollout.success), "reward": float(rollout.reward),
            "end_reason": ep.end_reason, "env_failure": ep.env_failure,
            "generated_tokens": rollout.num_generated,
            "turns": [dataclasses.asdict(t) for t in ep.turns],
            "passes": list(ep.result.passes), "failures": list(ep.result.failures),
            "behaviour": episode_behaviour(world, ep)}


def write(path: str | os.PathLike, rollouts: Sequence[Rollout], world: str, *, split: str,
          tag: str, iteration: int) -> None:
    """Appends the episodes of `rollouts` (those with an EpisodeRecord) to `path`."""
    with open(path, "a") as f:
        for r in rollouts:
            if r.episode is not None:
                f.write(json.dumps(line(r, world, split=split, tag=tag, iteration=iteration))
                        + "\n")


def training_sample(rollouts: Sequence[Rollout]) -> list[Rollout]:
    """The first rollout of each task (group) of an iteration, in group order."""
    first: dict[int, Rollout] = {}
    for r in rollouts:
        first.setdefault(r.group, r)
    return [first[g] for g in sorted(first)]


def read(path: str | os.PathLike) -> list[dict]:
    return read_jsonl(path)


def truncate(path: str | os.PathLike, iteration: int) -> None:
    """Keeps the episodes of iterations up to `iteration` (a resumed run writes the rest again).
    The 'before LOOP' evaluation is iteration 0; training rollouts of iteration i are i + 1's
    (written once its update is saved), as in metrics.jsonl."""
    if os.path.exists(path):
        rewrite_jsonl(path, [e for e in read_jsonl(path) if e["iteration"] <= iteration])


def record(line: dict) -> EpisodeRecord:
    """The EpisodeRecord a line was written from (what a world's behaviour measures read)."""
    passes, failures = tuple(line["passes"]), tuple(line["failures"])
    result = EvalResult(len(passes) + len(failures), passes, failures, line["reward"],
                        line["success"])
    return EpisodeRecord(line["task_id"], line["instruction"],
                         tuple(Turn(**t) for t in line["turns"]), line["end_reason"], result,
                         line["env_failure"])


def phases(path: str | os.PathLike, world: str) -> list[dict]:
    """Per (tag, iteration, split) of a file, in file order: episodes, TGC, mean reward and the
    world's behaviour measures as the current code computes them (loopjax.eval.behaviour)."""
    groups: dict[tuple, list[dict]] = {}
    for x in read(path):
        groups.setdefault((x["tag"], x["iteration"], x["split"]), []).append(x)
    return [{"tag": tag, "iteration": it, "split": split, "episodes": len(xs),
             "tgc": sum(x["success"] for x in xs) / len(xs),
             "reward": sum(x["reward"] for x in xs) / len(xs),
             **episode_measures([record(x) for x in xs], world)}
            for (tag, it, split), xs in groups.items()]


if __name__ == "__main__":
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=phases.__doc__)
    parser.add_argument("path")
    parser.add_argument("--world", required=True, help="the run's env, e.g. appworld-synth")
    args = parser.parse_args()
    for row in phases(args.path, args.world):
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
