"""Held-out evaluation as AppWorld scores it, and the run folder's report files.

TGC (task goal completion) = share of tasks whose unit tests all pass; SGC (scenario goal
completion) = share of scenarios (groups of related tasks) whose tasks all pass.
"""

from __future__ import annotations

import json
import os

import numpy as np

from loopjax import report
from loopjax.envs import scenario_id
from loopjax.envs.base import EpisodeRecord
from loopjax.envs.registry import episode_behaviour
from loopjax.metrics import read_jsonl, rewrite_jsonl
from loopjax.rollout.batch import Rollout
from loopjax.rollout.records import ShownEpisode

SPLITS = ("train", "dev", "test_normal", "test_challenge")
HELD_OUT = ("dev", "test_normal")  # the held-out success the README and the benchmarks report


def split_index(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else 100 + sum(map(ord, split))


def behaviour(records: list[Rollout], world: str) -> dict:
    """Behaviour measures over episodes of `world`: the share of turns whose code raised, turns
    per episode, and the world's own measures (`WorldEntry.behaviour`: for miniworld and AppWorld
    API-doc lookups per episode, the share that answered before reading any state, the share
    that walked a list's pages among episodes whose task needs it), each the mean over the
    episodes that report it."""
    return episode_measures([r.episode for r in records], world)


def episode_measures(episodes: list[EpisodeRecord], world: str) -> dict:
    """`behaviour` of finished episodes (e.g. read back from an episodes.jsonl)."""
    if not episodes:
        return {}
    out = {"code_error_rate": float(np.sum([e.code_errors for e in episodes])
                                    / max(1, np.sum([e.num_turns for e in episodes]))),
           "turns": float(np.mean([e.num_turns for e in episodes]))}
    measured = [episode_behaviour(world, e) for e in episodes]
    for name in dict.fromkeys(name for m in measured for name in m):
        out[name] = float(np.mean([m[name] for m in measured if name in m]))
    return out


def summarize(records: list[Rollout], world: str) -> dict:
    """TGC, SGC, mean reward, task and scenario counts and the behaviour measures of one
    evaluation's episodes of `world`."""
    if not records:
        return {"tgc": 0.0, "sgc": 0.0, "reward": 0.0, "num_tasks": 0, "num_scenarios": 0}
    scenarios: dict[str, bool] = {}
    for r in records:
        sid = scenario_id(r.task_id)
        scenarios[sid] = scenarios.get(sid, True) and r.success
    return {"tgc": float(np.mean([r.success for r in records])),
            "sgc": float(np.mean(list(scenarios.values()))),
            "reward": float(np.mean([r.reward for r in records])),
            "num_tasks": len(records), "num_scenarios": len(scenarios),
            **behaviour(records, world)}


def held_out_tgc(summaries: dict[str, dict], splits=HELD_OUT) -> float:
    """Task-weighted TGC over `splits` (those present) of {split: summarize(...)}."""
    present = [s for s in splits if s in summaries]
    tasks = sum(summaries[s]["num_tasks"] for s in present)
    return sum(summaries[s]["tgc"] * summaries[s]["num_tasks"] for s in present) / max(tasks, 1)


def prefixed(summary: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in summary.items()}


def truncate_metrics(path: str, iteration: int) -> None:
    """Drops log lines past the checkpoint a run resumes from (they will be written again)."""
    if not os.path.exists(path):
        return
    rewrite_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= iteration])


def write_reports(run_dir: str, summary: dict, episodes: list[ShownEpisode],
                  max_episodes: int) -> None:
    """summary.json, learning_curve.png, trajectories.html and the before/after table."""
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    report.learning_curve(run_dir)
    report.trajectories_html(report.choose_episodes(episodes, max_episodes),
                             os.path.join(run_dir, "trajectories.html"))
    with open(os.path.join(run_dir, "before_after.txt"), "w") as f:
        f.write(report.before_after_table(summary["before"], summary["after"]) + "\n")
