"""The transformer's pieces with a written-out backward pass (`jax.custom_vjp`), and their helpers.

Autodiff of each forward below is correct; each is written out because what autodiff keeps or
computes costs memory or time the learner's step notices (tests/test_model_gradients.py checks
every one against plain autodiff in float64):
- `rms_norm`: its row and column sums as einsums (XLA:CPU's fused multiply-then-reduce, what
  autodiff gives, is several times slower: `_rms_norm_bwd`).
- `swiglu`: keeps only its two inputs; autodiff would also keep sigmoid(gate) and silu(gate), two
  more B x T x F arrays per layer stacked by the layer scan.
- `lora_delta`: the adapter's gradients read the T x D input in place, never transposed.
- `blocked_causal_attention`: flash attention's backward, a query block at a time, from the saved
  log-sum-exp: no T x T array is kept and no T-sized matrix is transposed.
- `frozen_unembed_logprobs`: under a frozen unembedding each log-prob's gradient with respect to its
  hidden state is formed in the forward pass: two V x D matmuls per chunk instead of three.

Numerics as in transformer.py: sums, softmax and logits in fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def acc_dtype(dtype):
    """The dtype of norms, RoPE, softmax and logits: fp32, or float64 for float64 params."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


# ----------------------------------------------------------------------------- RMSNorm


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


# ----------------------------------------------------------------------------- SwiGLU


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


# ------------------------------------------------------------------------------ the LoRA delta


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lora_delta(scale, x_BxTxD, a_DxR, b_RxF):
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


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


# -------------------------------------------------------------------- blocked causal attention


def segment_causal_mask(ids_q, ids_k, q_start: int):
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
    mask = segment_causal_mask(ids_q, ids_k, a)[:, None, None]  # B x 1 x 1 x C x S
    return jnp.where(mask, s.reshape(B, Hk, M // C, C, S), -jnp.inf).reshape(B, Hk, M, S)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def blocked_causal_attention(chunk, q_BxTxHxDh, k_BxTxHkxDh, v_BxTxHkxDh, ids):
    """B x T x H x Dh: causal attention within segments, `chunk` queries at a time; ids =
    (segment_ids_BxT, prefix_ids_BxT or None) (`segment_causal_mask`). Query block [a, b) attends
    to keys [0, b) only."""
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
    for (a, b), lse in zip(_blocks(T, chunk), lses, strict=True):
        q_h = _group_heads(q[:, a:b], Hk)
        do_h = _group_heads(dout[:, a:b], Hk)
        o_h = _group_heads(out[:, a:b], Hk)
        p = jnp.exp(_block_scores(q_h, kT[..., :b], _cols(seg, a, b), _cols(seg, 0, b), a) - lse)
        dp = jnp.einsum("bkmd,bkds->bkms", do_h, vT[..., :b], preferred_element_type=acc)
        delta = jnp.sum(do_h.astype(acc) * o_h.astype(acc), axis=-1, keepdims=True)
        ds = (p * (dp - delta) * scale).astype(q.dtype)  # the gradient of the unscaled scores
        dq = jnp.einsum("bkms,bksd->bkmd", ds, k_h[:, :, :b], preferred_element_type=acc)
        dqs.append(_ungroup_heads(dq, b - a).astype(q.dtype))
        dkT = dkT.at[..., :b].add(jnp.einsum("bkmd,bkms->bkds", q_h, ds,
                                             preferred_element_type=acc))
        dvT = dvT.at[..., :b].add(jnp.einsum("bkmd,bkms->bkds", do_h, p.astype(v.dtype),
                                             preferred_element_type=acc))
    dk = dkT.transpose(0, 3, 1, 2).astype(k.dtype)
    dv = dvT.transpose(0, 3, 1, 2).astype(v.dtype)
    return jnp.concatenate(dqs, axis=1), dk, dv, None


blocked_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


# ------------------------------------------------------- log-probs under a frozen unembedding


def unembed_logits(w_DxV, h_BxTxD):
    """h W in the dtype of h, accumulated in fp32 (float64 for float64)."""
    return jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV.astype(h_BxTxD.dtype),
                      preferred_element_type=acc_dtype(h_BxTxD.dtype))


def map_chunks(f, xs, chunks):
    """lax.map of f over the leading axis of xs; entries at index >= `chunks` (a traced count)
    are skipped (zeros of f's output, no work)."""
    def one(args):
        i, x = args
        return jax.lax.cond(i < chunks, lambda: f(*x),
                            lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(f, *x)))
    n = jax.tree.leaves(xs)[0].shape[0]
    return jax.lax.map(one, (jnp.arange(n), xs))


def chunk_logprobs(w_DxV, h_BxCxD, tgt_BxC, temperature):
    """log softmax(h W / temperature)[target] of one chunk, and the softmax probabilities (unused,
    and so never computed, where only the log-probs are taken)."""
    logits_BxCxV = unembed_logits(w_DxV, h_BxCxD) / temperature
    picked = jnp.take_along_axis(logits_BxCxV, tgt_BxC[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    return picked - lse, jnp.exp(logits_BxCxV - lse[..., None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def frozen_unembed_logprobs(temperature, w_DxV, h_NxBxCxD, tgt_NxBxC, chunks):
    """Chunked token log-probs under a frozen unembedding W (the caller stops its gradient);
    chunks from `chunks` on are skipped (`map_chunks`)."""
    return map_chunks(lambda h, tgt: chunk_logprobs(w_DxV, h, tgt, temperature)[0],
                      (h_NxBxCxD, tgt_NxBxC), chunks)


def _frozen_unembed_fwd(temperature, w_DxV, h_NxBxCxD, tgt_NxBxC, chunks):
    """Each log-prob depends on its own hidden state only, through
    d logp_t / d h_t = (W[:, y_t] - W p_t) / temperature, a D-vector formed here while p_t is at
    hand; the backward pass only scales it. Two V x D matmuls per chunk instead of three
    (forward, rematerialized forward, backward), and no transpose of the logits' gradient."""
    def chunk(h_BxCxD, tgt_BxC):
        lp, probs = chunk_logprobs(w_DxV, h_BxCxD, tgt_BxC, temperature)
        w = w_DxV.astype(h_BxCxD.dtype)
        expected_BxCxD = jnp.einsum("bcv,dv->bcd", probs.astype(h_BxCxD.dtype), w,
                                    preferred_element_type=acc_dtype(h_BxCxD.dtype))
        picked_BxCxD = jnp.take(w.T, tgt_BxC, axis=0).astype(expected_BxCxD.dtype)
        return lp, ((picked_BxCxD - expected_BxCxD) / temperature).astype(h_BxCxD.dtype)

    lp, dlp_dh = map_chunks(chunk, (h_NxBxCxD, tgt_NxBxC), chunks)
    return lp, (dlp_dh, w_DxV, chunks)


def _frozen_unembed_bwd(temperature, residuals, g_NxBxC):
    dlp_dh, w_DxV, chunks = residuals
    dh = (g_NxBxC[..., None] * dlp_dh.astype(g_NxBxC.dtype)).astype(dlp_dh.dtype)
    return jnp.zeros_like(w_DxV), dh, None, None


frozen_unembed_logprobs.defvjp(_frozen_unembed_fwd, _frozen_unembed_bwd)
