"""LOOP update-step throughput on this CPU: prints ONE JSON line.

    python benchmarks/update_step.py [--small] [--rollouts 2] [--steps 1] [--repeats 2]
                                     [--seq 2048] [--remat] [--attention_chunk N]
                                     [--allocator system|tcmalloc]

- loopjax: the jitted update step (LoRA r16 on every projection, one minibatch of `--rollouts`
  rollouts of T tokens, gradient accumulation one rollout per microbatch) on a ~100M-parameter
  Qwen2-style config. Reports tokens/s, achieved model FLOP/s as a fraction of the dense fp32
  matmul FLOP/s measured in the same run, peak RSS, and the live copies of the base weights.
- peer: the same update written the way the LOOP PyTorch reference does it: transformers
  Qwen2ForCausalLM + peft LoRA, a forward/backward per rollout, clip_grad_norm_, torch AdamW.
Each side runs in its own subprocess so that peak memory is its own, both under the same C
allocator (`--allocator`, benchmarks/allocator.py; each reports the one it ran under and its
page faults per timed step). Model FLOPs per rollout =
forward (2 x layer matmul params x T + the unembedding 2 x D x V at the generated tokens, the
ones the loss reads + causal attention 2 x L x H x Dh x T^2) + an equal backward for the
activation gradients (the frozen base needs no weight gradients; LoRA's are negligible). Logits
at the other positions are work the loss does not need: not model FLOPs, on either side (the peer
computes them; loopjax skips them, `token_logprobs(needed_BxT=...)`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import allocator  # noqa: E402

FULL = dict(vocab_size=32768, hidden_size=768, intermediate_size=3584, num_layers=8, num_heads=12,
            num_kv_heads=2, head_dim=64)
SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
             num_kv_heads=2, head_dim=64)
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                 num_heads=14, num_kv_heads=2, head_dim=64)  # Qwen2.5-0.5B's shapes (for a GPU)
MODELS = {"qwen2-100m": FULL, "small": SMALL, "qwen2-0.5b": QWEN2_05B}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_flops(cfg: dict, T: int, rollouts: int, outputs: int) -> float:
    """FLOPs of one minibatch of `rollouts` rollouts of T tokens holding `outputs` generated
    tokens in all (the positions whose log-probs the loss reads)."""
    D, F, H, Hk, Dh, V, L = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_heads"],
                             cfg["num_kv_heads"], cfg["head_dim"], cfg["vocab_size"],
                             cfg["num_layers"])
    layer_params = L * (2 * D * H * Dh + 2 * D * Hk * Dh + 3 * D * F)
    attention = 2 * L * H * Dh * T * T  # causal QK^T and PV: half of 4 T^2
    forward = rollouts * (2 * layer_params * T + attention) + 2 * D * V * outputs
    return 2.0 * forward


def fake_rollouts(cfg: dict, T: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg["vocab_size"], (n, T)).astype(np.int32)
    is_output = rng.random((n, T)) < 0.5
    is_output[:, :T // 8] = False  # a prompt
    logp_old = np.where(is_output, -np.log(cfg["vocab_size"]) + rng.normal(0, 0.05, (n, T)), 0.0)
    adv = rng.normal(0, 0.5, n).astype(np.float32)
    return tokens, is_output, logp_old.astype(np.float32), adv


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def base_weight_copies(jax, state) -> float:
    """Live arrays shaped like a (large) base weight, per base weight of that shape.

    Arrays of the TrainState's adapter and optimizer state are excluded (their shapes may collide).
    1.0 means the base model exists exactly once: nothing copied it (donation, optimizer, jit).
    """
    from collections import Counter
    state_ids = {id(x) for x in jax.tree.leaves((state.trainable, state.opt_state))}
    base = Counter(x.shape for x in jax.tree.leaves(state.base) if x.size >= 100_000)
    live = Counter(x.shape for x in jax.live_arrays() if id(x) not in state_ids and x.shape in base)
    return max(live[s] / base[s] for s in base)


def run_jax(cfg: dict, T: int, n: int, steps: int, remat: bool = False,
            attention_chunk: int | None = None, dtype: str = "float32") -> dict:
    import jax
    import jax.numpy as jnp

    from loopjax.config import UpdateConfig
    from loopjax.loop.update import init_train_state, make_update_step
    from loopjax.models.config import ModelConfig
    from loopjax.models.transformer import init_params
    from loopjax.rollout import Rollout, pack_minibatch
    from loopjax.sharding import make_mesh

    mc = ModelConfig(**cfg, qkv_bias=True, tie_embeddings=True, rope_theta=1e6, family="qwen2",
                     dtype=dtype)
    if attention_chunk is not None:
        mc = mc.replace(attention_chunk=attention_chunk)
    uc = UpdateConfig(minibatch_size=n, microbatch_size=1, remat=remat, train_full_weights=False,
                      learning_rate=5e-5)  # LoRA r16 at lr 5e-5, as the peer below
    mesh = make_mesh("1,1,1", devices=jax.devices()[:1])
    state = init_train_state(mc, uc, init_params(mc, jax.random.key(0)), jax.random.key(1), mesh)
    step = make_update_step(mc, uc, mesh, state)
    tokens, is_output, logp_old, adv = fake_rollouts(cfg, T, n)
    rollouts = [Rollout(tokens=tokens[i], is_output=is_output[i], logp=logp_old[i],
                        turn_id=np.zeros(T, np.int32), reward=0.0, success=False, task_id="t",
                        group=i) for i in range(n)]
    batch = jax.device_put(pack_minibatch(rollouts, adv, n, T, microbatches=n),  # one per row
                           step.batch_sharding)

    start = time.perf_counter()
    state, metrics = step(state, batch)  # compile + one step
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state.trainable, metrics))
    step_s = (time.perf_counter() - start) / steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps

    copies = base_weight_copies(jax, state)

    # Dense matmul FLOP/s of this machine, measured in this process, in the model's dtype.
    N = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((N, N), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, a))
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        out = mm(a, a)
    jax.block_until_ready(out)
    matmul = 2 * N ** 3 * reps / (time.perf_counter() - start)
    return dict(step_s=step_s, first_step_s=first_s, tokens_per_s=n * T / step_s,
                peak_rss_mb=peak_rss_mb(), base_weight_copies=copies,
                device=str(jax.devices()[0].device_kind),
                matmul_flops_per_s=matmul, params=mc.num_params(), loss=float(metrics["loss"]),
                compiles=step.num_compiles(), attention_chunk=mc.attention_chunk,
                page_faults_per_step=faults, allocator=allocator.current())


def run_torch(cfg: dict, T: int, n: int, steps: int, dtype: str = "float32") -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = Qwen2Config(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                     intermediate_size=cfg["intermediate_size"],
                     num_hidden_layers=cfg["num_layers"],
                     num_attention_heads=cfg["num_heads"], num_key_value_heads=cfg["num_kv_heads"],
                     head_dim=cfg["head_dim"], tie_word_embeddings=True, rope_theta=1e6,
                     max_position_embeddings=max(T, 2048), use_cache=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = Qwen2ForCausalLM(hf).to(device=device, dtype=getattr(torch, dtype))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=list(TARGETS)))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5,
                            weight_decay=0.01)
    tokens, is_output, logp_old, adv = fake_rollouts(cfg, T, n)
    tokens, logp_old, adv, mask = (torch.from_numpy(x).to(device) for x in (
        tokens.astype(np.int64), logp_old, adv, is_output))
    eps = 0.1

    def one_step():
        opt.zero_grad()
        for i in range(n):  # the reference: one rollout per forward/backward
            logits = model(input_ids=tokens[i:i + 1]).logits[0, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, tokens[i, 1:, None])[:, 0]
            m = mask[i, 1:]
            ratio = torch.exp(logp - logp_old[i, 1:])
            surr = torch.minimum(ratio * adv[i], ratio.clamp(1 / (1 + eps), 1 + eps) * adv[i])
            loss = -(surr * m).sum() / m.sum() / n
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()

    start = time.perf_counter()
    one_step()
    sync()
    first_s = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    step_s = (time.perf_counter() - start) / steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    N = 2048 if device == "cpu" else 8192
    a = torch.ones(N, N, device=device, dtype=getattr(torch, dtype))
    torch.mm(a, a)
    sync()
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, a)
    sync()
    matmul = 2 * N ** 3 * reps / (time.perf_counter() - start)
    return dict(step_s=step_s, first_step_s=first_s, tokens_per_s=n * T / step_s,
                peak_rss_mb=peak_rss_mb(), matmul_flops_per_s=matmul, device=device,
                torch_threads=torch.get_num_threads(), page_faults_per_step=faults,
                allocator=allocator.current())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a ~10M model at T=512, for a quick run")
    ap.add_argument("--model", choices=sorted(MODELS), default=None,
                    help="the shapes (default qwen2-100m; --small is --model small)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="params and activations on both sides (bfloat16 for a GPU)")
    ap.add_argument("--rollouts", type=int, default=2, help="rollouts in the timed minibatch")
    ap.add_argument("--steps", type=int, default=1, help="timed update steps after the first")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs per side, alternating; each side reports its fastest")
    ap.add_argument("--seq", type=int, default=None, help="T (default 2048, 512 with --small)")
    ap.add_argument("--remat", action="store_true", help="loopjax side: rematerialize each layer")
    ap.add_argument("--attention_chunk", type=int, default=None,
                    help="loopjax side: queries per attention block (0 = one dense T x T block; "
                         "default: ModelConfig's)")
    ap.add_argument("--allocator", choices=allocator.CHOICES, default="system",
                    help="the C allocator of both sides (tcmalloc: LD_PRELOAD; "
                         "benchmarks/allocator.py)")
    ap.add_argument("--side", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = args.model or ("small" if args.small else "qwen2-100m")
    cfg = MODELS[model]
    T = args.seq or (512 if model == "small" else 2048)
    if args.side:
        if args.side == "jax":
            print(json.dumps(run_jax(cfg, T, args.rollouts, args.steps, args.remat,
                                     args.attention_chunk, args.dtype)))
        else:
            print(json.dumps(run_torch(cfg, T, args.rollouts, args.steps, args.dtype)))
        return
    # The sides alternate, `--repeats` times each, and each keeps its fastest run: this machine's
    # speed drifts by 10% and more over minutes, which one run per side would put in the ratio.
    sides, runs = {}, {"jax": [], "torch": []}
    for _ in range(args.repeats):
        for side in ("jax", "torch"):
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--rollouts",
                   str(args.rollouts), "--steps", str(args.steps), "--seq", str(T)] + (
                       ["--model", model, "--dtype", args.dtype]) + (
                       ["--remat"] if args.remat else []) + (
                       [] if args.attention_chunk is None or side == "torch"
                       else ["--attention_chunk", str(args.attention_chunk)])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env=allocator.env_for(args.allocator)).stdout
            run = json.loads(out.strip().splitlines()[-1])
            runs[side].append(round(run["step_s"], 2))
            if side not in sides or run["step_s"] < sides[side]["step_s"]:
                sides[side] = run
    outputs = int(fake_rollouts(cfg, T, args.rollouts)[1][:, 1:].sum())  # log-probs the loss reads
    flops = model_flops(cfg, T, args.rollouts, outputs)
    j, t = sides["jax"], sides["torch"]
    result = dict(
        figure="update_step", config=dict(cfg, T=T, rollouts_per_step=args.rollouts, lora_rank=16,
                                          remat=args.remat, model=model,
                                          allocator=sorted({j["allocator"], t["allocator"]}),
                                          params=j["params"], dtype=args.dtype,
                                          device=j["device"]),
        loopjax=dict(tokens_per_s=round(j["tokens_per_s"], 1), step_s=round(j["step_s"], 2),
                     first_step_s=round(j["first_step_s"], 2),
                     model_flops_per_s=round(flops / j["step_s"] / 1e9, 2),
                     matmul_flops_per_s=round(j["matmul_flops_per_s"] / 1e9, 2),
                     flops_fraction_of_matmul=round(
                         flops / j["step_s"] / j["matmul_flops_per_s"], 3),
                     peak_rss_mb=round(j["peak_rss_mb"]),
                     base_weight_copies=j["base_weight_copies"],
                     compiles=j["compiles"], page_faults_per_step=round(j["page_faults_per_step"])),
        peer_torch_peft=dict(tokens_per_s=round(t["tokens_per_s"], 1), step_s=round(t["step_s"], 2),
                             first_step_s=round(t["first_step_s"], 2),
                             model_flops_per_s=round(flops / t["step_s"] / 1e9, 2),
                             matmul_flops_per_s=round(t["matmul_flops_per_s"] / 1e9, 2),
                             flops_fraction_of_matmul=round(
                                 flops / t["step_s"] / t["matmul_flops_per_s"], 3),
                             peak_rss_mb=round(t["peak_rss_mb"]), threads=t["torch_threads"],
                             page_faults_per_step=round(t["page_faults_per_step"])),
        speedup_vs_peer=round(j["tokens_per_s"] / t["tokens_per_s"], 3),
        step_s_of_each_run=runs,
        model_flops_per_step_gflop=round(flops / 1e9, 1), generated_tokens_per_step=outputs,
        units="FLOP/s in GFLOP/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
