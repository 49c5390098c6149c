"""miniworld environment throughput: prints ONE JSON line.

    python benchmarks/env.py [--calls 5000] [--resets 30] [--episodes 40]

- api_calls_per_s: apis.* calls per second from agent code through the sandbox worker (pipe round
  trip + validation + handler), with the trainer and the worker pinned to ONE core (goal >= 500).
  Peer: the same calls made directly on the World object in-process (no sandbox).
- reset_ms: env.reset(task) plus a first trivial cell (so the worker start-up is counted).
- gt_episode_ms: a full ground-truth episode (reset, every turn, evaluate), tiny and full presets.
- appworld (with --servers N, after `python -m loopjax.envs.appworld_setup`): ground-truth
  episodes of the AppWorld-format suite through the real engine, N servers stepped in parallel
  threads (all cores): executes/s and episodes/min on loopjax's sandboxed server
  (loopjax/envs/appworld_jail.py; goal: at least 0.7x), on AppWorld's own unsandboxed server
  (peer_unsandboxed_*) and miniworld's ground-truth episodes on N envs, in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from loopjax.envs import ground_truth, list_tasks, make_env
from loopjax.envs.appworld_server import UNSAFE_ENV


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


def parallel_episodes(world: str, servers: int, seconds: float,
                      unsandboxed: bool = False) -> tuple[float, float]:
    """(executes/s, episodes/min) of ground-truth episodes on `servers` envs in parallel;
    `unsandboxed`: AppWorld's own server (agent code in its process) instead of loopjax's."""
    tasks = [t for split in ("train", "dev") for t in list_tasks(world, split)]
    envs = [make_env(world) for _ in range(servers)]
    if unsandboxed:
        os.environ[UNSAFE_ENV] = "1"
    try:
        for env in envs:  # servers up before the clock starts
            env.reset(tasks[0])
    finally:
        os.environ.pop(UNSAFE_ENV, None)

    def work(i: int) -> tuple[int, int]:
        env, steps, episodes, k = envs[i], 0, 0, i
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            task = tasks[k % len(tasks)]
            env.reset(task)
            for code in ground_truth(task, world):
                steps += 1
                if env.step(code).done:
                    break
            assert env.evaluate().success, task
            episodes, k = episodes + 1, k + servers
        return steps, episodes

    start = time.perf_counter()
    with ThreadPoolExecutor(servers) as pool:
        done = list(pool.map(work, range(servers)))
    wall = time.perf_counter() - start
    for env in envs:
        env.close()
    return sum(s for s, _ in done) / wall, 60 * sum(e for _, e in done) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--resets", type=int, default=30)
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--servers", type=int, default=0, help="AppWorld servers in parallel (0: skip)")
    ap.add_argument("--seconds", type=float, default=30.0, help="timed window per world")
    args = ap.parse_args()
    appworld = {}
    if args.servers:
        ex, ep = parallel_episodes("appworld-synth", args.servers, args.seconds)
        uex, uep = parallel_episodes("appworld-synth", args.servers, args.seconds, unsandboxed=True)
        mex, mep = parallel_episodes("miniworld", args.servers, args.seconds)
        appworld = {"appworld_servers": args.servers, "appworld_executes_per_s": round(ex, 1),
                    "appworld_episodes_per_min": round(ep, 1),
                    "peer_unsandboxed_appworld_executes_per_s": round(uex, 1),
                    "peer_unsandboxed_appworld_episodes_per_min": round(uep, 1),
                    "sandboxed_vs_unsandboxed": round(ex / uex, 2), "sandboxed_goal": 0.7,
                    "peer_miniworld_executes_per_s": round(mex, 1),
                    "peer_miniworld_episodes_per_min": round(mep, 1)}
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # workers inherit it
    sandboxed, direct = api_rate(args.calls)
    print(json.dumps({
        "benchmark": "env", "cores": 1,
        "api_calls_per_s": round(sandboxed), "peer_direct_api_calls_per_s": round(direct),
        "api_goal_per_s": 500,
        "reset_ms": round(reset_ms(args.resets), 1),
        "gt_episode_ms_tiny": round(gt_episode_ms("miniworld-tiny", args.episodes), 1),
        "gt_episode_ms_full": round(gt_episode_ms("miniworld", args.episodes), 1), **appworld}))


if __name__ == "__main__":
    main()
