"""One decoder-only transformer (Qwen2/Qwen2.5, Qwen3, Llama 3) as pure functions over a param pytree.

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
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from loopjax.models.config import ModelConfig



def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer inside a block."""
    D, F, H, Hk, Dh = (config.hidden_size, config.intermediate_size, config.num_heads,
                                          config.num_kv_heads, config.head_dim)
    return {"q_proj": (D, H * Dh), "k_proj": (D, Hk * Dh), "v_proj": (D, Hk * Dh),
                    "o_proj": (H * Dh, D), "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def init_params(config: ModelConfig, key: jax.Array) -> dict:
    """Random params (normal(0, 0.02) weights, unit norms, zero biases), for training from scratch."""
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


@flax.struct.dataclass
class KVCache:
    """Keys and values of B rows; `lengths_B` = how many positions of each row hold real tokens.

    Contiguous: k and v are L x B x S x Hk x Dh. Paged (`page_table_BxN` given): k and v are a pool
    of pages, L x P x page x Hk x Dh, and row b's position s lives in page
    page_table_BxN[b, s // page] at offset s % page (table entries >= P: no page; reads give
    zeros, writes are dropped). The layer scan then gathers one layer's pages at a time."""
    k_LxBxSxHkxDh: jax.Array
    v_LxBxSxHkxDh: jax.Array
    lengths_B: jax.Array
    page_table_BxN: jax.Array | None = None

    @property
    def max_len(self) -> int:
        if self.page_table_BxN is None:
            return self.k_LxBxSxHkxDh.shape[2]
        return self.page_table_BxN.shape[1] * self.k_LxBxSxHkxDh.shape[2]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.jnp_dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


# ----------------------------------------------------------------------------- building blocks


def acc_dtype(dtype):
    """The dtype of norms, RoPE, softmax and logits: fp32, or float64 for float64 params."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, in fp32 (float64 for float64)."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    acc = acc_dtype(x.dtype)
    x32 = x.astype(acc)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    s = scale.astype(acc).reshape((1,) * (x.ndim - 1) + (-1,))
    return (x32 * r * s).astype(x.dtype), (x, scale, s, r)


def _rms_norm_bwd(eps, residuals, dy):
    """With n = x r and g = dy * scale: dx = r (g - n mean(g n)), dscale = sum over rows of dy n.
    The row and column sums are einsums: XLA:CPU's fused multiply-then-reduce for them (what
    autodiff of the forward gives) took 6.8 ms for dx and 23.7 ms for both at 2048 x 768, against
    1.3 and 1.9 ms as einsums."""
    x, scale, s, r = residuals  # s: scale in the norm's dtype, shaped to broadcast
    hi = jax.lax.Precision.HIGHEST  # fp32 sums on TPU too (its default would round to bf16)
    n = x.astype(r.dtype) * r
    dy = dy.astype(r.dtype)
    g = dy * s
    mean_gn = jnp.einsum("...d,...d->...", g, n, precision=hi)[..., None] / x.shape[-1]
    dscale = jnp.einsum("...d,...d->d", dy, n, precision=hi)
    return (r * (g - n * mean_gn)).astype(x.dtype), dscale.astype(scale.dtype).reshape(scale.shape)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Inverse frequencies of RoPE, with Llama-3 wavelength-dependent scaling when configured."""
    Dh = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, Dh, 2, dtype=acc_dtype(config.dtype)) / Dh))
    if not config.rope_scaling:
        return inv_freq
    s = dict(config.rope_scaling)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * jnp.pi / inv_freq
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(middle, smoothed, scaled)


def apply_rope(x_BxTxNxDh, positions_BxT, inv_freq):
    """Rotates halves (the HF convention: pairs are (i, i + Dh/2)), in fp32 (float64 for float64)."""
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
        y = y + _lora_delta(lora_scale, x, a.astype(x.dtype), b.astype(x.dtype)).astype(y.dtype)
    return y


# Up to this many rows, XLA:CPU multiplies an F x D matrix fastest as the transposed product.
FEW_ROWS = 32


def matmul_t(x_BxTxD, w_FxD, preferred_element_type=None):
    """x W^T, B x T x F, for W stored F x D (a transposed kernel, or an embedding).

    On few rows (a decode step's B x 1, B <= FEW_ROWS) it is computed as (W x^T)^T: XLA:CPU's dot
    with the F x D matrix on the left runs 1.1-1.9x faster there than x W^T or x W with W stored
    D x F (docs/performance.md, "Another machine, and the sampler's kernels"). On more rows, as x W^T, which is as fast
    as x W. The forms differ only in the order of rounding."""
    B, T, _ = x_BxTxD.shape
    if B * T <= FEW_ROWS:
        return jnp.einsum("fd,btd->fbt", w_FxD, x_BxTxD,
                          preferred_element_type=preferred_element_type).transpose(1, 2, 0)
    return jnp.einsum("btd,fd->btf", x_BxTxD, w_FxD, preferred_element_type=preferred_element_type)


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up, keeping only its two inputs for the backward pass (sigmoid(gate) is
    recomputed there). Autodiff of the expression would also keep sigmoid(gate) and silu(gate):
    two more B x T x F arrays per layer, stacked by the layer scan for the backward pass."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
    """d/dg [g sigmoid(g)] = sigmoid(g) (1 + g (1 - sigmoid(g)))."""
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    return dh * up * sig * (1 + gate * (1 - sig)), dh * gate * sig


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora_delta(scale, x_BxTxD, a_DxR, b_RxF):
    """scale * (x A) B."""
    return _lora_delta_fwd(scale, x_BxTxD, a_DxR, b_RxF)[0]


def _lora_delta_fwd(scale, x, a, b):
    xa = jnp.einsum("btd,dr->btr", x, a)
    return scale * jnp.einsum("btr,rf->btf", xa, b), (x, a, b, xa)


def _lora_delta_bwd(scale, residuals, dy_BxTxF):
    """The adapter's gradients contract over tokens with the rank-r factor on the left (r x T),
    so the T x D input is read in place, never transposed (XLA transposes the larger operand
    of x^T g, and with it recomputes and re-reads the input's elementwise producer)."""
    x, a, b, xa = residuals
    g_BxTxR = scale * jnp.einsum("btf,rf->btr", dy_BxTxF, b)
    da = jnp.einsum("btr,btd->rd", g_BxTxR, x).T
    db = scale * jnp.einsum("btr,btf->rf", xa, dy_BxTxF)
    return jnp.einsum("btr,dr->btd", g_BxTxR, a), da, db


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


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


def _segment_causal_mask(ids_q, ids_k, q_start: int):
    """Query q_start + i may see key j <= q_start + i of its own segment, and of its shared prefix.

    ids_q / ids_k are (segment_ids, prefix_ids) of the queries (B x C) and keys (B x S); prefix_ids
    is None, or names the segment (a shared prompt earlier in the row) each token also attends to
    (0: none), which makes a row a tree: a prompt once, then each rollout's continuation of it."""
    (seg_q_BxC, pre_q_BxC), (seg_k_BxS, _) = ids_q, ids_k
    C, S = seg_q_BxC.shape[1], seg_k_BxS.shape[1]
    causal_CxS = (q_start + jnp.arange(C))[:, None] >= jnp.arange(S)[None, :]
    same_BxCxS = seg_q_BxC[:, :, None] == seg_k_BxS[:, None, :]
    if pre_q_BxC is not None:
        same_BxCxS |= (pre_q_BxC[:, :, None] == seg_k_BxS[:, None, :]) & (pre_q_BxC[:, :, None] > 0)
    return same_BxCxS & causal_CxS[None]


def _blocks(T: int, chunk: int) -> list[tuple[int, int]]:
    """Query blocks [a, b) of `chunk` queries (one block when chunk is 0 or >= T)."""
    chunk = T if not chunk or T <= chunk else chunk
    return [(a, min(a + chunk, T)) for a in range(0, T, chunk)]


def _group_heads(x_BxCxHxDh, Hk):
    """B x C x H x Dh -> B x Hk x (G*C) x Dh: each KV head's G query heads as one matrix of rows."""
    B, C, H, Dh = x_BxCxHxDh.shape
    x = x_BxCxHxDh.reshape(B, C, Hk, H // Hk, Dh).transpose(0, 2, 3, 1, 4)
    return x.reshape(B, Hk, (H // Hk) * C, Dh)


def _ungroup_heads(x_BxHkxMxDh, C):
    B, Hk, M, Dh = x_BxHkxMxDh.shape
    x = x_BxHkxMxDh.reshape(B, Hk, M // C, C, Dh).transpose(0, 3, 1, 2, 4)
    return x.reshape(B, C, M // C * Hk, Dh)


def _cols(ids, a, b):
    """Columns [a, b) of (segment_ids, prefix_ids or None)."""
    return tuple(None if x is None else x[:, a:b] for x in ids)


def _block_scores(q_BxHkxMxDh, kT_BxHkxDhxS, ids_q, ids_k, a):
    """One query block's scaled scores over keys [0, S) (fp32 or float64), -inf where masked."""
    B, Hk, M, _ = q_BxHkxMxDh.shape
    C, S = ids_q[0].shape[1], ids_k[0].shape[1]
    acc = acc_dtype(q_BxHkxMxDh.dtype)
    s = jnp.einsum("bkmd,bkds->bkms", q_BxHkxMxDh, kT_BxHkxDhxS,
                   preferred_element_type=acc) * (q_BxHkxMxDh.shape[-1] ** -0.5)
    mask = _segment_causal_mask(ids_q, ids_k, a)[:, None, None]  # B x 1 x 1 x C x S
    return jnp.where(mask, s.reshape(B, Hk, M // C, C, S), -jnp.inf).reshape(B, Hk, M, S)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _causal_attention(chunk, q_BxTxHxDh, k_BxTxHkxDh, v_BxTxHkxDh, ids):
    return _causal_attention_fwd(chunk, q_BxTxHxDh, k_BxTxHkxDh, v_BxTxHkxDh, ids)[0]


def _causal_attention_fwd(chunk, q, k, v, seg):
    B, T, H, Dh = q.shape
    Hk = k.shape[2]
    kT, v_h = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # B x Hk x Dh x T, B x Hk x T x Dh
    outs, lses = [], []
    for a, b in _blocks(T, chunk):
        s = _block_scores(_group_heads(q[:, a:b], Hk), kT[..., :b], _cols(seg, a, b),
                          _cols(seg, 0, b), a)
        # Every query sees at least itself, so each row has a finite max. One exp per score, and
        # the probabilities are softmax's (`attention`'s, the sampler's) to the rounding: in bf16
        # the sampler's log-probs are the learner's.
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        total = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("bkms,bksd->bkmd", (e / total).astype(v.dtype), v_h[:, :, :b])
        outs.append(_ungroup_heads(o, b - a))
        lses.append(m + jnp.log(total))
    out = jnp.concatenate(outs, axis=1)
    return out, (q, k, v, seg, out, lses)


def _causal_attention_bwd(chunk, residuals, dout):
    """Flash-attention's backward, one query block at a time: P is recomputed from the saved
    log-sum-exp, dS = P * (dP - rowsum(dO * O)); dK and dV are accumulated transposed
    (Dh x T), so that no T-sized matrix is ever transposed."""
    q, k, v, seg, out, lses = residuals
    B, T, H, Dh = q.shape
    Hk = k.shape[2]
    acc = acc_dtype(q.dtype)
    scale = Dh ** -0.5
    kT, vT, k_h = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 3, 1), k.transpose(0, 2, 1, 3)
    dkT = jnp.zeros((B, Hk, Dh, T), acc)
    dvT = jnp.zeros((B, Hk, Dh, T), acc)
    dqs = []
    for (a, b), lse in zip(_blocks(T, chunk), lses):
        q_h = _group_heads(q[:, a:b], Hk)
        do_h = _group_heads(dout[:, a:b], Hk)
        o_h = _group_heads(out[:, a:b], Hk)
        p = jnp.exp(_block_scores(q_h, kT[..., :b], _cols(seg, a, b), _cols(seg, 0, b), a) - lse)
        dp = jnp.einsum("bkmd,bkds->bkms", do_h, vT[..., :b], preferred_element_type=acc)
        delta = jnp.sum(do_h.astype(acc) * o_h.astype(acc), axis=-1, keepdims=True)
        ds = (p * (dp - delta) * scale).astype(q.dtype)  # the gradient of the unscaled scores
        dq = jnp.einsum("bkms,bksd->bkmd", ds, k_h[:, :, :b], preferred_element_type=acc)
        dqs.append(_ungroup_heads(dq, b - a).astype(q.dtype))
        dkT = dkT.at[..., :b].add(jnp.einsum("bkmd,bkms->bkds", q_h, ds, preferred_element_type=acc))
        dvT = dvT.at[..., :b].add(jnp.einsum("bkmd,bkms->bkds", do_h, p.astype(v.dtype),
                                             preferred_element_type=acc))
    dk = dkT.transpose(0, 3, 1, 2).astype(k.dtype)
    dv = dvT.transpose(0, 3, 1, 2).astype(v.dtype)
    return jnp.concatenate(dqs, axis=1), dk, dv, None


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def causal_attention(q_BxTxHxDh, k_BxTxHkxDh, v_BxTxHkxDh, segment_ids_BxT, chunk: int,
                     prefix_ids_BxT=None):
    """Causal attention within segments (packed rows), `chunk` queries at a time; B x T x H*Dh.
    With `prefix_ids_BxT` a token also sees the prefix segment it names (`_segment_causal_mask`).

    Query block [a, b) attends to keys [0, b) only: the scores never exceed [chunk, T] and blocks
    above the causal diagonal are never computed. The backward pass is written out (flash
    attention's, a query block at a time): it recomputes each block's probabilities from the saved
    log-sum-exp, so no T x T array is kept, and every matmul reads its T-sized operands in place
    (XLA would otherwise transpose the scores). chunk 0 (or T <= chunk): one block.
    """
    B, T, H, Dh = q_BxTxHxDh.shape
    out = _causal_attention(chunk, q_BxTxHxDh, k_BxTxHkxDh, v_BxTxHkxDh,
                            (segment_ids_BxT, prefix_ids_BxT))
    return out.reshape(B, T, H * Dh)


def block(config, x_BxTxD, p, lora_p, lora_scale, positions_BxT, attend, kv_cache):
    """One pre-norm block. Without a cache `attend` is (segment_ids_BxT, prefix_ids_BxT or None)
    (causal attention within segments and their shared prefixes); with one it is mask_BxTxS over
    the cache, and kv_cache = (k, v, write_idx_BxT, layer_idx, page_table_BxN or None): the whole
    cache (see KVCache) and this block's layer in it.
    Returns (x, (k, v) updated)."""
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
    new_kv = None
    if kv_cache is not None:
        # The whole [L, ...] cache is carried through the layer scan and this layer's entries are
        # written in place (a per-layer cache as scan input/output would copy it every call).
        cache_k, cache_v, write_idx_BxT, layer_idx, table_BxN = kv_cache
        if table_BxN is None:
            where = (jnp.arange(B)[:, None], write_idx_BxT)
        else:  # (page, offset) of each new token; positions past the table have no page
            page = cache_k.shape[2]
            where = (jnp.take_along_axis(table_BxN, write_idx_BxT // page, axis=1, mode="fill",
                                         fill_value=cache_k.shape[1]), write_idx_BxT % page)
        # mode="drop": a write past the cache end is dropped, never clamped onto real entries.
        cache_k = cache_k.at[(layer_idx, *where)].set(k.astype(cache_k.dtype), mode="drop")
        cache_v = cache_v.at[(layer_idx, *where)].set(v.astype(cache_v.dtype), mode="drop")
        new_kv = (cache_k, cache_v)
        if table_BxN is None:
            k, v = cache_k[layer_idx], cache_v[layer_idx]
        else:  # this layer's pages of each row, in position order: one gather from the pool
            k, v = (x.at[layer_idx, table_BxN].get(mode="fill", fill_value=0)
                    .reshape(B, -1, Hk, Dh) for x in (cache_k, cache_v))
    if kv_cache is None:
        attn = causal_attention(q, k, v, attend[0], config.attention_chunk, attend[1])
    else:
        attn = attention(q, k, v, attend)
    x_BxTxD = x_BxTxD + lin(attn, name="o_proj")

    # --- SwiGLU MLP
    h = rms_norm(x_BxTxD, p["mlp_norm"], eps)
    h = swiglu(lin(h, name="gate_proj"), lin(h, name="up_proj"))
    return x_BxTxD + lin(h, name="down_proj"), new_kv


# ----------------------------------------------------------------------------- the model


def _lora_parts(lora):
    if lora is None:
        return None, 1.0
    return lora.weights, lora.scale


def sampler_layout(params, lora=None):
    """(params, lora) in the sampler's CPU layout: the layer-stacked weights split into tuples of
    per-layer trees, and each fp32 (or float64) projection kernel stored transposed ("kernel_t",
    F x D).

    Split: `hidden_states` then runs the layers as a Python loop (unrolled) rather than a scan.
    XLA:CPU copies a layer's slice out of a stacked weight every time a scan step reads it, which
    inside a decode loop is every decoded token; split once before that loop, each layer's weights
    are read in place. Transposed: a decode step's few rows multiply an F x D kernel faster
    (`matmul_t`). bf16 kernels stay D x F: a bf16 product is rounded to bf16, and the sampler's
    bf16 log-probs are the learner's (9.5e-7 apart) only while both run the same dot (transposed:
    8.9e-4 apart, `tests/test_sampling.py -k bf16`). The layout is one copy of the weights (split
    and transposed in the same copy)."""
    def split(tree):
        n = jax.tree.leaves(tree)[0].shape[0]
        return tuple(jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n))

    def transposed(w):  # one projection's {"kernel", "bias"?}; norms' scales pass through
        if not (isinstance(w, dict) and "kernel" in w
                and w["kernel"].dtype in (jnp.float32, jnp.float64)):
            return w
        rest = {k: v for k, v in w.items() if k != "kernel"}
        return {"kernel_t": w["kernel"].T, **rest}
    layers = tuple({name: transposed(w) for name, w in layer.items()}
                   for layer in split(params["layers"]))
    params = {**params, "layers": layers}
    return params, (None if lora is None else lora.replace(weights=split(lora.weights)))


def _over_layers(f, carry, xs):
    """lax.scan(f, carry, xs) for layer-stacked xs; a Python loop over unstacked ones
    (`sampler_layout`: xs = ((layers tuple, LoRA tuple or None), layer indices))."""
    (layers, lora_layers), idx = xs
    if not isinstance(layers, tuple):
        return jax.lax.scan(f, carry, xs)[0]
    for i, p in enumerate(layers):
        carry, _ = f(carry, ((p, None if lora_layers is None else lora_layers[i]), i))
        # Each layer's output stored in its dtype, as the scan stores it. Fused into what comes
        # next, bf16 activations would skip that rounding (XLA's excess precision) and the
        # sampler's log-probs would drift from the learner's (1.8e-3 where 4.8e-7 is measured).
        carry = jax.lax.optimization_barrier(carry)
    return carry


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
        attend = (segment_ids_BxT, prefix_ids_BxT)  # causal_attention masks each query block
        write_idx_BxT = None
    else:
        # Row b's new tokens sit at cache positions lengths[b] + t; padding tokens (segment 0) are
        # written too but never attended by real tokens and are overwritten by the next call.
        write_idx_BxT = cache.lengths_B[:, None] + t_T[None, :]
        if positions_BxT is None:
            positions_BxT = write_idx_BxT
        s_S = jnp.arange(cache.max_len)
        attend = s_S[None, None, :] <= write_idx_BxT[:, :, None]  # mask_BxTxS over the cache

    x_BxTxD = jnp.take(params["embed"], tokens_BxT, axis=0)
    lora_w, lora_scale = _lora_parts(lora)
    layers = ((params["layers"], lora_w), jnp.arange(config.num_layers))

    def layer(x, xs):
        (p, lp), _ = xs
        x, _ = block(config, x, p, lp, lora_scale, positions_BxT, attend, None)
        return x, None

    def cached_layer(carry, xs):
        x, ck, cv = carry
        (p, lp), i = xs
        x, (ck, cv) = block(config, x, p, lp, lora_scale, positions_BxT, attend,
                            (ck, cv, write_idx_BxT, i, cache.page_table_BxN))
        return (x, ck, cv), None

    if cache is None:
        if config.remat:
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
        x_BxTxD = _over_layers(layer, x_BxTxD, layers)
        return rms_norm(x_BxTxD, params["final_norm"], config.rms_norm_eps), None
    x_BxTxD, ck, cv = _over_layers(
        cached_layer, (x_BxTxD, cache.k_LxBxSxHkxDh, cache.v_LxBxSxHkxDh), layers)
    h_BxTxD = rms_norm(x_BxTxD, params["final_norm"], config.rms_norm_eps)
    num_new_B = jnp.sum(segment_ids_BxT > 0, axis=1).astype(jnp.int32)
    return h_BxTxD, KVCache(ck, cv, cache.lengths_B + num_new_B, cache.page_table_BxN)


def unembed(config: ModelConfig, params, h_BxTxD):
    """fp32 logits; the matmul accumulates in fp32 without upcasting bf16 weights in memory."""
    if config.tie_embeddings:  # the embedding is the unembedding stored V x D
        return matmul_t(h_BxTxD, params["embed"].astype(h_BxTxD.dtype),
                        preferred_element_type=acc_dtype(h_BxTxD.dtype))
    return _logits(unembedding(config, params), h_BxTxD)


def unembedding(config: ModelConfig, params):
    """W, D x V: the embedding transposed when tied."""
    return params["embed"].T if config.tie_embeddings else params["unembed"]


def _logits(w_DxV, h_BxTxD):
    return jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV.astype(h_BxTxD.dtype),
                      preferred_element_type=acc_dtype(h_BxTxD.dtype))


def forward(config: ModelConfig, params, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None,
                        lora=None, cache: KVCache | None = None):
    """logits_BxTxV (fp32); with a cache, returns (logits_BxTxV, new_cache)."""
    h, new_cache = hidden_states(config, params, tokens_BxT, positions_BxT=positions_BxT,
                                                              segment_ids_BxT=segment_ids_BxT, lora=lora, cache=cache)
    logits = unembed(config, params, h)
    return logits if cache is None else (logits, new_cache)


def token_logprobs(config: ModelConfig, params, tokens_BxT, *, positions_BxT=None,
                   segment_ids_BxT=None, prefix_ids_BxT=None, lora=None,
                   temperature: float = 1.0, needed_BxT=None):
    """logp_BxT[b, t] = log p(tokens[b, t] | tokens[b, <t]) within its segment (and the shared
    prefix segment `prefix_ids_BxT` names, if any: `_segment_causal_mask`).

    0 at t = 0, at each segment's first token and on padding. The log-softmax over V runs on chunks
    of `config.logits_chunk` tokens, so a [B, T, V] array of logits never exists at once (152K-vocab
    Qwen at T = 32K would need 19 GB per row). With a LoRA adapter the unembedding is frozen, and
    the gradient of each log-prob with respect to its hidden state is formed in the forward pass
    (`_frozen_unembed_logprobs`); with trained weights each chunk is rematerialized instead.

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
        lp_NxBxC = _frozen_unembed_logprobs(temperature, jax.lax.stop_gradient(w_DxV),
                                            h_NxBxCxD, tgt_NxBxC, chunks)
    else:
        lp_NxBxC = _map_chunks(jax.checkpoint(
            lambda h, tgt: _chunk_logprobs(w_DxV, h, tgt, temperature)[0]),
            (h_NxBxCxD, tgt_NxBxC), chunks)
    lp_next_BxT = lp_NxBxC.transpose(1, 0, 2).reshape(B, n * C)[:, :T]
    if order_BxT is not None:  # back to position order
        lp_next_BxT = jnp.zeros_like(lp_next_BxT).at[jnp.arange(B)[:, None], order_BxT].set(
            lp_next_BxT, unique_indices=True)
    logp_BxT = jnp.concatenate([jnp.zeros((B, 1), lp_next_BxT.dtype), lp_next_BxT[:, :-1]], axis=1)
    continues = (segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1]) & (segment_ids_BxT[:, 1:] > 0)
    valid_BxT = jnp.concatenate([jnp.zeros((B, 1), bool), continues], axis=1)
    return jnp.where(valid_BxT, logp_BxT, 0.0)


def _map_chunks(f, xs, chunks):
    """lax.map of f over the leading axis of xs; entries at index >= `chunks` (a traced count)
    are skipped (zeros of f's output, no work)."""
    def one(args):
        i, x = args
        return jax.lax.cond(i < chunks, lambda: f(*x),
                            lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(f, *x)))
    n = jax.tree.leaves(xs)[0].shape[0]
    return jax.lax.map(one, (jnp.arange(n), xs))


def _chunk_logprobs(w_DxV, h_BxCxD, tgt_BxC, temperature):
    """log softmax(h W / temperature)[target] of one chunk, and the softmax probabilities (unused,
    and so never computed, where only the log-probs are taken)."""
    logits_BxCxV = _logits(w_DxV, h_BxCxD) / temperature
    picked = jnp.take_along_axis(logits_BxCxV, tgt_BxC[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    return picked - lse, jnp.exp(logits_BxCxV - lse[..., None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _frozen_unembed_logprobs(temperature, w_DxV, h_NxBxCxD, tgt_NxBxC, chunks):
    """Chunked token log-probs under a frozen unembedding W (the caller stops its gradient);
    chunks from `chunks` on are skipped (`_map_chunks`)."""
    return _map_chunks(lambda h, tgt: _chunk_logprobs(w_DxV, h, tgt, temperature)[0],
                       (h_NxBxCxD, tgt_NxBxC), chunks)


def _frozen_unembed_fwd(temperature, w_DxV, h_NxBxCxD, tgt_NxBxC, chunks):
    """Each log-prob depends on its own hidden state only, through
    d logp_t / d h_t = (W[:, y_t] - W p_t) / temperature, a D-vector formed here while p_t is at
    hand; the backward pass only scales it. Two V x D matmuls per chunk instead of three
    (forward, rematerialized forward, backward), and no transpose of the logits' gradient."""
    def chunk(h_BxCxD, tgt_BxC):
        lp, probs = _chunk_logprobs(w_DxV, h_BxCxD, tgt_BxC, temperature)
        w = w_DxV.astype(h_BxCxD.dtype)
        expected_BxCxD = jnp.einsum("bcv,dv->bcd", probs.astype(h_BxCxD.dtype), w,
                                    preferred_element_type=acc_dtype(h_BxCxD.dtype))
        picked_BxCxD = jnp.take(w.T, tgt_BxC, axis=0).astype(expected_BxCxD.dtype)
        return lp, ((picked_BxCxD - expected_BxCxD) / temperature).astype(h_BxCxD.dtype)

    lp, dlp_dh = _map_chunks(chunk, (h_NxBxCxD, tgt_NxBxC), chunks)
    return lp, (dlp_dh, w_DxV, chunks)


def _frozen_unembed_bwd(temperature, residuals, g_NxBxC):
    dlp_dh, w_DxV, chunks = residuals
    dh = (g_NxBxC[..., None] * dlp_dh.astype(g_NxBxC.dtype)).astype(dlp_dh.dtype)
    return jnp.zeros_like(w_DxV), dh, None, None


_frozen_unembed_logprobs.defvjp(_frozen_unembed_fwd, _frozen_unembed_bwd)
