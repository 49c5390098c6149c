"""Sampler throughput: loopjax's SamplingEngine vs transformers' generate (PyTorch, CPU), same run.

A ~100M-parameter Qwen2-style model (D=768, L=12, H=12, Hk=2, F=2048, V=32000, tied embeddings),
or with `--model smollm2` SmolLM2-135M's shapes (Llama: D=576, L=30, H=9, Hk=3, F=1536,
V=49152, tied; `qwen2-0.5b` for a GPU), random weights, `--dtype` (fp32 by default) on both
sides, the same thread count. Decode tokens/s at 1, 8 and 32
concurrent sequences (temperature 1.0 sampling, no stop ids, fixed new-token count), prefill
tokens/s, and how far decode is from the memory-bandwidth bound: bytes read per decode step
(every weight once + the KV-cache prefix the step attends to) / the machine's copy bandwidth,
measured here with a large numpy copy; and the compute bound (2 x params FLOPs per token / a large
numpy matmul's FLOP/s), which is what limits CPU decode at 32 sequences; and each side's rate for
one D -> F projection on that many rows, alone (`projection_GFLOPs`: the kernels under both
decodes). Also decode with one step per call (a host round trip per token) against the fused
on-device loop. Prints ONE JSON line.

    python benchmarks/sampler.py [--quick] [--threads N] [--model qwen2-100m|smollm2|qwen2-0.5b]
                                 [--dtype float32|bfloat16] [--allocator system|tcmalloc]

Both sides share this process, and so its C allocator (`--allocator`: the script re-executes
itself under tcmalloc; benchmarks/allocator.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import allocator  # noqa: E402


def _args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short prompts and replies (a smoke run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="CPU threads for both sides")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated sequence counts")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--decode-steps", type=int, default=64, help="fused decode steps per call")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights and activations on both sides (bfloat16 for a GPU)")
    ap.add_argument("--model", choices=("qwen2-100m", "smollm2", "qwen2-0.5b"),
                    default="qwen2-100m",
                    help="the shapes (random weights): the default ~100M Qwen2, or SmolLM2-135M's")
    ap.add_argument("--allocator", choices=allocator.CHOICES, default="system",
                    help="the C allocator of this process, both sides (benchmarks/allocator.py)")
    return ap.parse_args()


ARGS = _args()
allocator.ensure(ARGS.allocator, sys.argv)
# XLA:CPU runs on every core (os.cpu_count()); torch gets --threads (default: the same count).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from loopjax.models.config import ModelConfig  # noqa: E402
from loopjax.models.transformer import init_params, matmul_t  # noqa: E402
from loopjax.sampling import SamplingEngine  # noqa: E402

MODELS = {  # name -> (transformers config class, its arguments)
    "qwen2-100m": ("Qwen2Config", dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True, max_position_embeddings=4096)),
    "smollm2": ("LlamaConfig", dict(  # SmolLM2-135M-Instruct's config.json
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=1e5,
        tie_word_embeddings=True, max_position_embeddings=8192)),
    "qwen2-0.5b": ("Qwen2Config", dict(  # Qwen2.5-0.5B's shapes (for a GPU)
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True, max_position_embeddings=4096)),
}
HF_CONFIG = getattr(transformers, MODELS[ARGS.model][0])(**MODELS[ARGS.model][1])
HF = MODELS[ARGS.model][1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _best_seconds(call, repeats):
    """The fastest of `repeats` timed calls of call() (which returns when its work is done)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
    return best


def memory_bandwidth(nbytes=1 << 29, repeats=3):
    """Bytes moved per second by a large copy (read + write): numpy's on a CPU, jax's on an
    accelerator."""
    if jax.default_backend() != "cpu":
        src, copy = jnp.ones(nbytes // 4), jax.jit(lambda x: x + 1)
        copy(src).block_until_ready()  # compile
        return 2 * nbytes / _best_seconds(lambda: copy(src).block_until_ready(), repeats)
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: np.copyto(dst, src), repeats)


def matmul_flops(n=2048, repeats=3):
    """FLOP/s of a large matmul: the machine's practical compute peak (numpy fp32 on a CPU; jax
    in the benchmark's dtype on an accelerator)."""
    if jax.default_backend() != "cpu":
        a, mm = jnp.ones((4 * n, 4 * n), ARGS.dtype), jax.jit(lambda a: a @ a)
        mm(a).block_until_ready()  # compile
        return 2 * (4 * n) ** 3 / _best_seconds(lambda: mm(a).block_until_ready(), repeats)
    a = np.ones((n, n), np.float32)
    a @ a
    return 2 * n ** 3 / _best_seconds(lambda: a @ a, repeats)


def row_matmul_rates(D, F, rows, repeats=20):
    """GFLOP/s of a decode step's D -> F projection on `rows` rows, alone, in each side's form:
    loopjax's on CPU in fp32 (the kernel stored F x D, `matmul_t`; x W elsewhere) and torch's
    `F.linear` (x W^T, W stored F x D). What the sides' decode at that many sequences is built
    on."""
    x, flops = jnp.ones((rows, 1, D), ARGS.dtype), 2 * rows * D * F
    if jax.default_backend() == "cpu" and ARGS.dtype == "float32":
        mm, w = jax.jit(matmul_t), jnp.ones((F, D), ARGS.dtype)
    else:
        mm, w = jax.jit(lambda x, w: jnp.einsum("btd,df->btf", x, w)), jnp.ones((D, F), ARGS.dtype)
    mm(x, w).block_until_ready()
    ours = _best_seconds(lambda: mm(x, w).block_until_ready(), repeats)
    xt = torch.ones(rows, D, dtype=getattr(torch, ARGS.dtype), device=DEVICE)
    wt = torch.ones(F, D, dtype=xt.dtype, device=DEVICE)
    with torch.no_grad():
        torch.nn.functional.linear(xt, wt)
        _sync()
        peer = _best_seconds(lambda: (torch.nn.functional.linear(xt, wt), _sync()), repeats)
    return dict(loopjax=round(flops / ours / 1e9, 1), torch=round(flops / peer / 1e9, 1))


def bench_loopjax(config, params, concurrency, P, N, steps):
    rng = np.random.default_rng(1)
    S = max(concurrency)
    engine = SamplingEngine(config, S, P + N + 1, decode_steps=steps, prefill_chunk=512)
    out = {}
    for n in concurrency:
        # Reps 0 and 1 compile, rep 2 is timed: the pool grows during rep 0's decode, so rep 1's
        # prefill meets a new pool size (a new program); from then on the shapes repeat. Each
        # rep starts as a collection does, with the prefix cache reset (its pages freed).
        for _rep in range(3):
            engine.reset_prefix_cache()
            for s in range(n):
                engine.free(s)
                engine.add(s, rng.integers(0, config.vocab_size, P), key=jax.random.key(s),
                           max_new_tokens=N, temperature=1.0)
            t0 = time.perf_counter()
            engine._prefill(params, None, list(range(n)))
            engine.pool.k.block_until_ready()
            t1 = time.perf_counter()
            made = 0
            while engine.busy():
                made += sum(len(g.ids) for g in engine.step(params))
            t2 = time.perf_counter()
        assert made == n * N, made
        out[n] = dict(decode_tok_s=n * N / (t2 - t1), prefill_tok_s=n * (P - 1) / (t1 - t0))
    return out


def bench_hf(model, concurrency, P, N):
    rng = np.random.default_rng(0)
    out = {}
    gen = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
               pad_token_id=0)
    for n in concurrency:
        ids = torch.tensor(rng.integers(0, HF["vocab_size"], (n, P)), device=DEVICE)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
            _sync()
            t0 = time.perf_counter()
            model(ids)  # prefill alone
            _sync()
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen)
            _sync()
            t2 = time.perf_counter()
            model.generate(ids, max_new_tokens=N, min_new_tokens=N, **gen)
            _sync()
            t3 = time.perf_counter()
        # Decode = the N-token run minus the 1-token run (prefill + first token).
        out[n] = dict(decode_tok_s=n * (N - 1) / ((t3 - t2) - (t2 - t1)),
                      prefill_tok_s=n * P / (t1 - t0))
    return out


def main():
    P = ARGS.prompt_len or (32 if ARGS.quick else 128)
    N = ARGS.new_tokens or (16 if ARGS.quick else 64)
    steps = min(ARGS.decode_steps, N)
    concurrency = [int(c) for c in ARGS.concurrency.split(",")]
    torch.set_num_threads(ARGS.threads)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(HF_CONFIG).to(
        device=DEVICE, dtype=getattr(torch, ARGS.dtype)).eval()
    config = ModelConfig.from_hf_dict(HF_CONFIG.to_dict(), dtype=ARGS.dtype)
    params = init_params(config, jax.random.key(0))

    bw, flops = memory_bandwidth(), matmul_flops()
    rows = max(concurrency)
    row_rates = row_matmul_rates(config.hidden_size, config.intermediate_size, rows)
    # Interleaved per concurrency (ours, then the peer), so a change in machine load between the
    # two sides skews one pair of numbers rather than the whole comparison.
    ours, peer, unfused = {}, {}, {}
    for n in concurrency:
        ours.update(bench_loopjax(config, params, [n], P, N, steps))
        # One decode step per call: a round trip per token.
        if n in (concurrency[0], concurrency[-1]):
            unfused.update(bench_loopjax(config, params, [n], P, N, 1))
        peer.update(bench_hf(hf_model, [n], P, N))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    # The engine attends to a power-of-two cache prefix >= the longest row + the steps of a call.
    len_bucket = min(1 << (P + steps - 1).bit_length(), P + N + 1)
    kv_bytes_per_row = (2 * config.num_layers * len_bucket * config.num_kv_heads * config.head_dim
                        * jnp.dtype(ARGS.dtype).itemsize)
    result = dict(
        benchmark="sampler", quick=ARGS.quick, threads=ARGS.threads, allocator=allocator.current(),
        model=dict(name=ARGS.model, params=int(config.num_params()), D=config.hidden_size,
                   L=config.num_layers, H=config.num_heads, Hk=config.num_kv_heads,
                   F=config.intermediate_size, V=config.vocab_size, dtype=ARGS.dtype),
        prompt_len=P, new_tokens=N, decode_steps_per_call=steps,
        memory_bandwidth_GBps=round(bw / 1e9, 2), matmul_GFLOPs=round(flops / 1e9, 1),
        projection_GFLOPs=dict(rows=rows, D=config.hidden_size, F=config.intermediate_size,
                               **row_rates),
        jax=jax.__version__, torch=torch.__version__,
        transformers=transformers.__version__, devices=str(jax.devices()[0].platform))
    for n in concurrency:
        step_bytes = weight_bytes + n * kv_bytes_per_row
        bound = n * bw / step_bytes
        compute_bound = flops / (2 * config.num_params())  # matmul FLOPs per token, attention aside
        result[f"c{n}"] = dict(
            loopjax_decode_tok_s=round(ours[n]["decode_tok_s"], 1),
            loopjax_decode_tok_s_1step_per_call=(round(unfused[n]["decode_tok_s"], 1)
                                                 if n in unfused else None),
            hf_decode_tok_s=round(peer[n]["decode_tok_s"], 1),
            decode_speedup=round(ours[n]["decode_tok_s"] / peer[n]["decode_tok_s"], 2),
            loopjax_prefill_tok_s=round(ours[n]["prefill_tok_s"], 1),
            hf_prefill_tok_s=round(peer[n]["prefill_tok_s"], 1),
            bandwidth_bound_tok_s=round(bound, 1),
            fraction_of_bound=round(ours[n]["decode_tok_s"] / bound, 3),
            compute_bound_tok_s=round(compute_bound, 1),
            fraction_of_compute_bound=round(ours[n]["decode_tok_s"] / compute_bound, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
