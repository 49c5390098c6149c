"""A decoder-only transformer (Qwen2/Qwen2.5, Qwen3, Llama 3) as pure functions over a param pytree.

Params are nested dicts of arrays; every per-layer tensor is stacked on a leading L axis so the
layers run under one `lax.scan` (one layer compiled, not L):

    embed V x D;  final_norm D;  unembed D x V (absent when embeddings are tied)
    layers/attn_norm, layers/mlp_norm                      L x D
    layers/{q,k,v}_proj/kernel L x D x (H*Dh | Hk*Dh), bias L x (H*Dh | Hk*Dh) (Qwen2 only)
    layers/o_proj/kernel L x (H*Dh) x D
    layers/{q,k}_norm L x Dh (Qwen3 only)
    layers/{gate,up}_proj/kernel L x D x F;  layers/down_proj/kernel L x F x D

Numerics: matmuls in the params dtype; RMSNorm, RoPE, softmax and logits in fp32 (float64 when the
params are float64, under JAX's x64 mode: a numerics check that rounding, not a mismatch, separates
two paths).

Rows are right-padded or packed: `segment_ids_BxT` (0 = padding, 1, 2, ... = packed sequences);
attention stays within a segment and is causal. The KV-cache path (used by loopjax.sampling)
appends each row's new tokens after that row's cached ones.

The pieces whose backward pass is written out (RMSNorm, SwiGLU, the LoRA delta, blocked causal
attention, log-probs under a frozen unembedding) are in kernels.py; the sampler's CPU layout of
the weights (per-layer, transposed kernels) in cpu_layout.py; the KV cache in kv_cache.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from loopjax.models.config import ModelConfig

# FEW_ROWS, sampler_layout and init_cache are re-exported: callers import them from here.
from loopjax.models.cpu_layout import FEW_ROWS, matmul_t, over_layers, sampler_layout  # noqa: F401
from loopjax.models.kernels import (
    acc_dtype,
    blocked_causal_attention,
    chunk_logprobs,
    frozen_unembed_logprobs,
    lora_delta,
    map_chunks,
    rms_norm,
    swiglu,
    unembed_logits,
)
from loopjax.models.kv_cache import KVCache, LayerCache, init_cache, write_and_read  # noqa: F401


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer inside a block."""
    D, F, H, Hk, Dh = (config.hidden_size, config.intermediate_size, config.num_heads,
                       config.num_kv_heads, config.head_dim)
    return {"q_proj": (D, H * Dh), "k_proj": (D, Hk * Dh), "v_proj": (D, Hk * Dh),
            "o_proj": (H * Dh, D), "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def init_params(config: ModelConfig, key: jax.Array) -> dict:
    """Random params (normal(0, 0.02) weights, unit norms, zero biases), to train from scratch."""
    dtype, L, D, V = config.jnp_dtype, config.num_layers, config.hidden_size, config.vocab_size
    keys = iter(jax.random.split(key, 16))

    def normal(shape):
        return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    layers = {"attn_norm": jnp.ones((L, D), dtype), "mlp_norm": jnp.ones((L, D), dtype)}
    for name, (fan_in, fan_out) in projection_shapes(config).items():
        layers[name] = {"kernel": normal((L, fan_in, fan_out))}
        if config.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            layers[name]["bias"] = jnp.zeros((L, fan_out), dtype)
    if config.qk_norm:
        layers["q_norm"] = jnp.ones((L, config.head_dim), dtype)
        layers["k_norm"] = jnp.ones((L, config.head_dim), dtype)
    params = {"embed": normal((V, D)), "layers": layers, "final_norm": jnp.ones((D,), dtype)}
    if not config.tie_embeddings:
        params["unembed"] = normal((D, V))
    return params


# ----------------------------------------------------------------------------- building blocks


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Inverse frequencies of RoPE, with Llama-3 wavelength-dependent scaling when configured."""
    Dh = config.head_dim
    i_Dh2 = jnp.arange(0, Dh, 2, dtype=acc_dtype(config.dtype))
    inv_freq = 1.0 / (config.rope_theta ** (i_Dh2 / Dh))
    if not config.rope_scaling:
        return inv_freq
    s = dict(config.rope_scaling)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * jnp.pi / inv_freq
    smooth = ((old_len / wavelen - s["low_freq_factor"])
              / (s["high_freq_factor"] - s["low_freq_factor"]))
    smoothed = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(middle, smoothed, scaled)


def apply_rope(x_BxTxNxDh, positions_BxT, inv_freq):
    """Rotates halves (HF's convention: pairs are (i, i + Dh/2)), in fp32 (float64 for float64)."""
    acc = acc_dtype(x_BxTxNxDh.dtype)
    angles_BxTxDh2 = positions_BxT[..., None].astype(acc) * inv_freq[None, None].astype(acc)
    cos, sin = jnp.cos(angles_BxTxDh2)[:, :, None, :], jnp.sin(angles_BxTxDh2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxDh.astype(acc), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxDh.dtype)


def linear(x, p, name, lora_p, lora_scale):
    """y = x W (+ b) (+ scale * x A B): the LoRA path never materializes W + AB. W is
    p[name]["kernel"] (D x F), or p[name]["kernel_t"] (F x D, the sampler's CPU layout:
    `sampler_layout`)."""
    if "kernel_t" in p[name]:
        y = matmul_t(x, p[name]["kernel_t"])
    else:
        y = jnp.einsum("btd,df->btf", x, p[name]["kernel"])
    if "bias" in p[name]:
        y = y + p[name]["bias"][None, None]
    if lora_p is not None and name in lora_p:
        a, b = lora_p[name]["a"], lora_p[name]["b"]
        y = y + lora_delta(lora_scale, x, a.astype(x.dtype), b.astype(x.dtype)).astype(y.dtype)
    return y


def attention(q_BxTxHxDh, k_BxSxHkxDh, v_BxSxHkxDh, mask_BxTxS):
    """Grouped-query attention with fp32 scores and softmax.

    One query per row (a decode step) takes its scores transposed, S x G per KV head, with the
    keys on the left of the product: XLA:CPU then reads each row's cached keys in their
    S x Hk x Dh order instead of transposing them to Dh x S first (decode at 32 sequences: 7-8%
    more tokens/s at the default benchmark's shapes, 13% at SmolLM2's; docs/performance.md)."""
    B, T, H, Dh = q_BxTxHxDh.shape
    Hk = k_BxSxHkxDh.shape[2]
    acc = acc_dtype(q_BxTxHxDh.dtype)
    if T == 1:
        q_BxHkxGxDh = q_BxTxHxDh.reshape(B, Hk, H // Hk, Dh)
        scores = jnp.einsum("bskd,bkgd->bksg", k_BxSxHkxDh, q_BxHkxGxDh,
                            preferred_element_type=acc) * (Dh ** -0.5)
        scores = jnp.where(mask_BxTxS[:, 0, None, :, None], scores, jnp.finfo(acc).min)
        probs = jax.nn.softmax(scores, axis=2).astype(v_BxSxHkxDh.dtype)
        return jnp.einsum("bksg,bskd->bkgd", probs, v_BxSxHkxDh).reshape(B, T, H * Dh)
    q_BxTxHkxGxDh = q_BxTxHxDh.reshape(B, T, Hk, H // Hk, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxHkxGxDh, k_BxSxHkxDh,
                        preferred_element_type=acc) * (Dh ** -0.5)
    scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxHkxDh.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxHkxDh)
    return out.reshape(B, T, H * Dh)


def causal_attention(q_BxTxHxDh, k_BxTxHkxDh, v_BxTxHkxDh, segment_ids_BxT, chunk: int,
                     prefix_ids_BxT=None):
    """Causal attention within segments (packed rows), `chunk` queries at a time; B x T x H*Dh.
    With `prefix_ids_BxT` a token also sees the prefix segment it names (`segment_causal_mask`).

    Query block [a, b) attends to keys [0, b) only: the scores never exceed [chunk, T] and blocks
    above the causal diagonal are never computed. The backward pass is flash attention's
    (`kernels.blocked_causal_attention`): no T x T array is kept, and every matmul reads its
    T-sized operands in place. chunk 0 (or T <= chunk): one block.
    """
    B, T, H, Dh = q_BxTxHxDh.shape
    out = blocked_causal_attention(chunk, q_BxTxHxDh, k_BxTxHkxDh, v_BxTxHkxDh,
                                   (segment_ids_BxT, prefix_ids_BxT))
    return out.reshape(B, T, H * Dh)


class CausalAttend(NamedTuple):
    """A block's attention without a cache: causal within segments (packed rows) and the shared
    prefix segments they name (`segment_causal_mask`), `config.attention_chunk` queries at a
    time."""
    segment_ids_BxT: jax.Array
    prefix_ids_BxT: jax.Array | None = None


class MaskAttend(NamedTuple):
    """A block's attention over a cache: query t of row b sees cache position s where
    mask_BxTxS[b, t, s]."""
    mask_BxTxS: jax.Array


def block(config, x_BxTxD, p, lora_p, lora_scale, positions_BxT,
          attend: CausalAttend | MaskAttend, kv_cache: LayerCache | None):
    """One pre-norm block: (x_BxTxD, kv_cache with this block's new keys and values written, or
    None without a cache). With a cache, `attend` is a MaskAttend over the cache's positions."""
    B, T, _ = x_BxTxD.shape
    H, Hk, Dh, eps = config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps
    inv_freq = rope_inv_freq(config)
    lin = functools.partial(linear, p=p, lora_p=lora_p, lora_scale=lora_scale)

    # --- attention
    h = rms_norm(x_BxTxD, p["attn_norm"], eps)
    q = lin(h, name="q_proj").reshape(B, T, H, Dh)
    k = lin(h, name="k_proj").reshape(B, T, Hk, Dh)
    v = lin(h, name="v_proj").reshape(B, T, Hk, Dh)
    if config.qk_norm:
        q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
    q, k = apply_rope(q, positions_BxT, inv_freq), apply_rope(k, positions_BxT, inv_freq)
    if kv_cache is not None:
        kv_cache, k, v = write_and_read(kv_cache, k, v)
    if isinstance(attend, CausalAttend):
        attn = causal_attention(q, k, v, attend.segment_ids_BxT, config.attention_chunk,
                                attend.prefix_ids_BxT)
    else:
        attn = attention(q, k, v, attend.mask_BxTxS)
    x_BxTxD = x_BxTxD + lin(attn, name="o_proj")

    # --- SwiGLU MLP
    h = rms_norm(x_BxTxD, p["mlp_norm"], eps)
    h = swiglu(lin(h, name="gate_proj"), lin(h, name="up_proj"))
    return x_BxTxD + lin(h, name="down_proj"), kv_cache


# ----------------------------------------------------------------------------- the model


def hidden_states(config: ModelConfig, params, tokens_BxT, *, positions_BxT=None,
                  segment_ids_BxT=None, prefix_ids_BxT=None, lora=None,
                  cache: KVCache | None = None):
    """Final-normed hidden states h_BxTxD (and the updated cache when given one). Without a cache,
    `prefix_ids_BxT` (optional) lets each token also attend to a shared prefix segment."""
    B, T = tokens_BxT.shape
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    t_T = jnp.arange(T)
    if cache is None:
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(t_T, (B, T))
        attend = CausalAttend(segment_ids_BxT, prefix_ids_BxT)  # masked a query block at a time
        write_idx_BxT = None
    else:
        # Row b's new tokens sit at cache positions lengths[b] + t; padding tokens (segment 0) are
        # written too but never attended by real tokens and are overwritten by the next call.
        write_idx_BxT = cache.lengths_B[:, None] + t_T[None, :]
        if positions_BxT is None:
            positions_BxT = write_idx_BxT
        s_S = jnp.arange(cache.max_len)
        attend = MaskAttend(s_S[None, None, :] <= write_idx_BxT[:, :, None])

    x_BxTxD = jnp.take(params["embed"], tokens_BxT, axis=0)
    lora_w, lora_scale = (None, 1.0) if lora is None else (lora.weights, lora.scale)
    layers = ((params["layers"], lora_w), jnp.arange(config.num_layers))

    def layer(x, xs):
        (p, lp), _ = xs
        x, _ = block(config, x, p, lp, lora_scale, positions_BxT, attend, None)
        return x, None

    def cached_layer(carry, xs):
        x, ck, cv = carry
        (p, lp), i = xs
        x, c = block(config, x, p, lp, lora_scale, positions_BxT, attend,
                     LayerCache(ck, cv, write_idx_BxT, i, cache.page_table_BxN))
        return (x, c.k_LxBxSxHkxDh, c.v_LxBxSxHkxDh), None

    if cache is None:
        if config.remat:
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
        x_BxTxD = over_layers(layer, x_BxTxD, layers)
        return rms_norm(x_BxTxD, params["final_norm"], config.rms_norm_eps), None
    x_BxTxD, ck, cv = over_layers(
        cached_layer, (x_BxTxD, cache.k_LxBxSxHkxDh, cache.v_LxBxSxHkxDh), layers)
    h_BxTxD = rms_norm(x_BxTxD, params["final_norm"], config.rms_norm_eps)
    num_new_B = jnp.sum(segment_ids_BxT > 0, axis=1).astype(jnp.int32)
    return h_BxTxD, KVCache(ck, cv, cache.lengths_B + num_new_B, cache.page_table_BxN)


def unembed(config: ModelConfig, params, h_BxTxD):
    """fp32 logits; the matmul accumulates in fp32 without upcasting bf16 weights in memory."""
    if config.tie_embeddings:  # the embedding is the unembedding stored V x D
        return matmul_t(h_BxTxD, params["embed"].astype(h_BxTxD.dtype),
                        preferred_element_type=acc_dtype(h_BxTxD.dtype))
    return unembed_logits(unembedding(config, params), h_BxTxD)


def unembedding(config: ModelConfig, params):
    """W, D x V: the embedding transposed when tied."""
    return params["embed"].T if config.tie_embeddings else params["unembed"]


def forward(config: ModelConfig, params, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None,
            lora=None, cache: KVCache | None = None):
    """logits_BxTxV (fp32); with a cache, returns (logits_BxTxV, new_cache)."""
    h, new_cache = hidden_states(config, params, tokens_BxT, positions_BxT=positions_BxT,
                                 segment_ids_BxT=segment_ids_BxT, lora=lora, cache=cache)
    logits_BxTxV = unembed(config, params, h)
    return logits_BxTxV if cache is None else (logits_BxTxV, new_cache)


def token_logprobs(config: ModelConfig, params, tokens_BxT, *, positions_BxT=None,
                   segment_ids_BxT=None, prefix_ids_BxT=None, lora=None,
                   temperature: float = 1.0, needed_BxT=None):
    """logp_BxT[b, t] = log p(tokens[b, t] | tokens[b, <t]) within its segment (and the shared
    prefix segment `prefix_ids_BxT` names, if any: `segment_causal_mask`).

    0 at t = 0, at each segment's first token and on padding. The log-softmax over V runs on chunks
    of `config.logits_chunk` tokens, so a [B, T, V] array of logits never exists at once (152K-vocab
    Qwen at T = 32K would need 19 GB per row). With a LoRA adapter the unembedding is frozen, and
    the gradient of each log-prob with respect to its hidden state is formed in the forward pass
    (`frozen_unembed_logprobs`); with trained weights each chunk is rematerialized instead.

    `needed_BxT` (optional, bool): the positions whose log-prob the caller uses (the learner's:
    the generated tokens). Each row's hidden states are then sorted with the needed positions
    first, and chunks holding none are skipped, so the unembedding costs what the needed tokens
    need, not T. Elsewhere the result is 0 or the log-prob (whichever its chunk gave).
    """
    B, T = tokens_BxT.shape
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    h_BxTxD, _ = hidden_states(config, params, tokens_BxT, positions_BxT=positions_BxT,
                               segment_ids_BxT=segment_ids_BxT, prefix_ids_BxT=prefix_ids_BxT,
                               lora=lora)
    # Hidden state at t predicts token t + 1.
    targets_BxT = jnp.concatenate([tokens_BxT[:, 1:], jnp.zeros((B, 1), tokens_BxT.dtype)], axis=1)
    C = min(config.logits_chunk, T)
    n = -(-T // C)
    if needed_BxT is None:
        order_BxT, chunks = None, n
    else:  # h_t is needed where logp_{t+1} is; those first in each row (a stable sort)
        need_BxT = jnp.concatenate([needed_BxT[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
        order_BxT = jnp.argsort(~need_BxT, axis=1, stable=True)
        h_BxTxD = jnp.take_along_axis(h_BxTxD, order_BxT[..., None], axis=1)
        targets_BxT = jnp.take_along_axis(targets_BxT, order_BxT, axis=1)
        chunks = -(-jnp.max(jnp.sum(need_BxT, axis=1)) // C)  # chunks >= this are skipped
    pad = n * C - T
    h_NxBxCxD = (jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
                 .reshape(B, n, C, -1).transpose(1, 0, 2, 3))
    tgt_NxBxC = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(B, n, C).transpose(1, 0, 2)

    w_DxV = unembedding(config, params)
    if lora is not None:
        lp_NxBxC = frozen_unembed_logprobs(temperature, jax.lax.stop_gradient(w_DxV),
                                           h_NxBxCxD, tgt_NxBxC, chunks)
    else:
        lp_NxBxC = map_chunks(jax.checkpoint(
            lambda h, tgt: chunk_logprobs(w_DxV, h, tgt, temperature)[0]),
            (h_NxBxCxD, tgt_NxBxC), chunks)
    lp_next_BxT = lp_NxBxC.transpose(1, 0, 2).reshape(B, n * C)[:, :T]
    if order_BxT is not None:  # back to position order
        lp_next_BxT = jnp.zeros_like(lp_next_BxT).at[jnp.arange(B)[:, None], order_BxT].set(
            lp_next_BxT, unique_indices=True)
    logp_BxT = jnp.concatenate([jnp.zeros((B, 1), lp_next_BxT.dtype), lp_next_BxT[:, :-1]], axis=1)
    continues = (segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1]) & (segment_ids_BxT[:, 1:] > 0)
    valid_BxT = jnp.concatenate([jnp.zeros((B, 1), bool), continues], axis=1)
    return jnp.where(valid_BxT, logp_BxT, 0.0)
