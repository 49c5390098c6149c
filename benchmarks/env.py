"""miniworld environment throughput: prints ONE JSON line.

    python benchmarks/env.py [--calls 5000] [--resets 30] [--episodes 40]

- api_calls_per_s: apis.* calls per second from agent code through the sandbox worker (pipe round
  trip + validation + handler), with the trainer and the worker pinned to ONE core (goal >= 500).
  Peer: the same calls made directly on the World object in-process (no sandbox).
- reset_ms: env.reset(task) plus a first trivial cell (so the worker start-up is counted).
- gt_episode_ms: a full ground-truth episode (reset, every turn, evaluate), tiny and full presets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from loopjax.envs import ground_truth, list_tasks, make_env


def api_rate(n: int) -> tuple[float, float]:
    env = make_env("miniworld-tiny")
    env.reset(list_tasks("miniworld-tiny", "train")[0])
    env.step("x = 1")  # the worker is up
    code = f"for i in range({n}):\n    apis.phone.search_contacts(query='a', page_limit=2)"
    start = time.perf_counter()
    out = env.step(code).output
    sandboxed = n / (time.perf_counter() - start)
    assert out == "Execution successful.", out
    start = time.perf_counter()
    for _ in range(n):
        env.world.call("phone", "search_contacts", {"query": "a", "page_limit": 2})
    direct = n / (time.perf_counter() - start)
    env.close()
    return sandboxed, direct


def reset_ms(n: int) -> float:
    env = make_env("miniworld")
    tasks = list_tasks("miniworld", "train")
    times = []
    for i in range(n):
        start = time.perf_counter()
        env.reset(tasks[i % len(tasks)])
        env.step("x = 1")
        times.append(time.perf_counter() - start)
    env.close()
    return 1000 * statistics.median(times)


def gt_episode_ms(world: str, n: int) -> float:
    env = make_env(world)
    tasks = list_tasks(world, "train")[:n]
    times = []
    for t in tasks:
        start = time.perf_counter()
        env.reset(t)
        for code in ground_truth(t, world):
            env.step(code)
        assert env.evaluate().success, t
        times.append(time.perf_counter() - start)
    env.close()
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--resets", type=int, default=30)
    ap.add_argument("--episodes", type=int, default=40)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # workers inherit it
    sandboxed, direct = api_rate(args.calls)
    print(json.dumps({
        "benchmark": "env", "cores": 1,
        "api_calls_per_s": round(sandboxed), "peer_direct_api_calls_per_s": round(direct),
        "api_goal_per_s": 500,
        "reset_ms": round(reset_ms(args.resets), 1),
        "gt_episode_ms_tiny": round(gt_episode_ms("miniworld-tiny", args.episodes), 1),
        "gt_episode_ms_full": round(gt_episode_ms("miniworld", args.episodes), 1)}))


if __name__ == "__main__":
    main()
