"""The learner's hand-written backward passes against plain autodiff, in float64.

`loopjax.models.kernels` writes five backward passes itself, for speed: blocked (flash)
attention, the LoRA delta, the log-probs under a frozen unembedding, RMSNorm and SwiGLU. Here the
same model is written out plainly (dense masked attention, `x @ A @ B`, a full log-softmax, a plain
RMSNorm, silu(gate) * up), differentiated by `jax.grad`, and compared in float64 (x64 mode), where
rounding is ~1e-15 and any mistake shows. Both sides run jitted (one compile each, not one per
eager op).
The building blocks the reference shares with the model (RoPE, the masked `attention` of the
KV-cache path) are checked against transformers in test_models.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.models import transformer as tf
from loopjax.models.config import ModelConfig
from loopjax.models.lora import LoRA, LoraConfig, init_lora

TEMPERATURE = 0.7


def _plain_rms_norm(x, scale, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale.reshape(
        (1,) * (x.ndim - 1) + (-1,))


SEGMENTS = np.array([[1] * 8 + [2] * 9 + [0] * 2, [1] * 19])  # two packed sequences + padding; one
POSITIONS = np.array([list(range(8)) + list(range(9)) + [0, 0], list(range(19))])
VARIANTS = {  # Qwen2 (bias, tied), Qwen3 (q/k norm), Llama (untied)
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, tie_embeddings=True),
    "llama": dict(),
}


def _config(variant, **kw):
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, dtype="float64",
                       attention_chunk=5, logits_chunk=7, **VARIANTS[variant], **kw)


def _random(tree, key, scale):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype)
                              for x, k in zip(leaves, keys, strict=True)])


def plain_mask(seg, pre=None):
    """B x T x T: query i sees key j <= i of its own segment (or of the prefix segment pre[i])."""
    T = seg.shape[1]
    see = seg[:, :, None] == seg[:, None, :]
    if pre is not None:
        see = see | ((pre[:, :, None] == seg[:, None, :]) & (pre[:, :, None] > 0))
    return see & (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])[None]


def reference_logprobs(config, params, lora_weights, lora_scale, tokens, segments, positions):
    """token_logprobs written plainly: dense masked attention, x A B, a full log-softmax."""
    B, T = tokens.shape
    H, Hk, Dh = config.num_heads, config.num_kv_heads, config.head_dim
    inv_freq = tf.rope_inv_freq(config)
    mask = plain_mask(segments)

    def linear(x, p, lp, name):
        y = x @ p[name]["kernel"]
        if "bias" in p[name]:
            y = y + p[name]["bias"][None, None]
        return y + lora_scale * (x @ lp[name]["a"]) @ lp[name]["b"]

    x = params["embed"][tokens]
    for layer in range(config.num_layers):
        p = jax.tree.map(lambda a: a[layer], params["layers"])  # noqa: B023 (run at once)
        lp = jax.tree.map(lambda a: a[layer], lora_weights)  # noqa: B023 (run at once)
        h = _plain_rms_norm(x, p["attn_norm"], config.rms_norm_eps)
        q = linear(h, p, lp, "q_proj").reshape(B, T, H, Dh)
        k = linear(h, p, lp, "k_proj").reshape(B, T, Hk, Dh)
        v = linear(h, p, lp, "v_proj").reshape(B, T, Hk, Dh)
        if config.qk_norm:
            q = _plain_rms_norm(q, p["q_norm"], config.rms_norm_eps)
            k = _plain_rms_norm(k, p["k_norm"], config.rms_norm_eps)
        q, k = tf.apply_rope(q, positions, inv_freq), tf.apply_rope(k, positions, inv_freq)
        x = x + linear(tf.attention(q, k, v, mask), p, lp, "o_proj")
        h = _plain_rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
        x = x + linear(jax.nn.silu(linear(h, p, lp, "gate_proj")) * linear(h, p, lp, "up_proj"),
                       p, lp, "down_proj")
    x = _plain_rms_norm(x, params["final_norm"], config.rms_norm_eps)
    w = params["embed"].T if config.tie_embeddings else params["unembed"]
    logp = jax.nn.log_softmax(x @ w / TEMPERATURE, axis=-1)
    nxt = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    valid = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    return jnp.concatenate([jnp.zeros((B, 1)), jnp.where(valid, nxt, 0.0)], axis=1)


def _setup(variant):
    config = _config(variant)
    params = _random(tf.init_params(config, jax.random.key(0)), jax.random.key(1), 0.02)
    lora = init_lora(config, LoraConfig(), jax.random.key(2))
    # B starts at zero (the adapter starts as the identity); random B makes every gradient live.
    weights = _random(jax.tree.map(lambda x: x.astype(jnp.float64), lora.weights),
                      jax.random.key(3), 0.1)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, SEGMENTS.shape), jnp.int32)
    weight_BxT = jnp.asarray(rng.normal(size=SEGMENTS.shape))
    return config, params, LoRA(weights=weights, scale=lora.scale), tokens, weight_BxT


def _max_rel_diff(a_tree, b_tree):
    diffs = [float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
             for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True)]
    return max(diffs)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_gradients_match_plain_autodiff(variant):
    with jax.enable_x64(True):
        config, params, lora, tokens, weight = _setup(variant)
        seg, pos = jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS)

        def fast(w):
            return jnp.sum(weight * tf.token_logprobs(
                config, params, tokens, positions_BxT=pos, segment_ids_BxT=seg,
                lora=lora.replace(weights=w), temperature=TEMPERATURE))

        def plain(w):
            return jnp.sum(weight * reference_logprobs(config, params, w, lora.scale, tokens,
                                                       seg, pos))

        value, grads = jax.jit(jax.value_and_grad(fast))(lora.weights)
        ref_value, ref_grads = jax.jit(jax.value_and_grad(plain))(lora.weights)
        assert abs(float(value - ref_value)) < 1e-10 * abs(float(ref_value))
        assert min(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads)) > 1e-4
        assert _max_rel_diff(ref_grads, grads) < 1e-10  # measured: 3e-14 or less


@pytest.mark.parametrize("variant", ["qwen2", "llama"])
def test_full_weight_gradients_match_plain_autodiff(variant):
    """Full-weight training: every param's gradient, the (tied or untied) unembedding's included."""
    with jax.enable_x64(True):
        config, params, lora, tokens, weight = _setup(variant)
        seg, pos = jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS)
        zero = jax.tree.map(jnp.zeros_like, lora.weights)

        def fast(p):
            return jnp.sum(weight * tf.token_logprobs(config, p, tokens, positions_BxT=pos,
                                                      segment_ids_BxT=seg, temperature=TEMPERATURE))

        def plain(p):
            return jnp.sum(weight * reference_logprobs(config, p, zero, 0.0, tokens, seg, pos))

        grads, ref_grads = jax.jit(jax.grad(fast))(params), jax.jit(jax.grad(plain))(params)
        assert _max_rel_diff(ref_grads, grads) < 1e-10


@pytest.mark.parametrize("variant,trained", [("qwen2", "lora"), ("llama", "lora"),
                                              ("qwen2", "full"), ("llama", "full")])
def test_needed_positions_only_match_plain_autodiff(variant, trained):
    """token_logprobs(needed_BxT=...) (the learner's: log-probs of generated tokens only) sorts
    each row's needed positions first and skips the chunks past them: the values there and the
    gradient of a loss over them equal the plain model's. 5 needed positions per row, spread
    over all three 7-token chunks, so that one chunk is computed and two are skipped."""
    with jax.enable_x64(True):
        config, params, lora, tokens, weight = _setup(variant)
        seg, pos = jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS)
        needed = np.zeros(SEGMENTS.shape, bool)
        needed[0, [2, 6, 10, 14, 16]] = needed[1, [1, 8, 12, 17, 18]] = True
        needed = jnp.asarray(needed)
        lora_w = lora.weights if trained == "lora" else jax.tree.map(jnp.zeros_like, lora.weights)
        scale = lora.scale if trained == "lora" else 0.0

        def fast(p, w):
            return tf.token_logprobs(config, p, tokens, positions_BxT=pos, segment_ids_BxT=seg,
                                     lora=lora.replace(weights=w) if trained == "lora" else None,
                                     temperature=TEMPERATURE, needed_BxT=needed)

        def plain(p, w):
            return reference_logprobs(config, p, w, scale, tokens, seg, pos)

        def loss(f):
            return lambda p, w: jnp.sum(jnp.where(needed, weight * f(p, w), 0.0))
        argnum = 1 if trained == "lora" else 0
        lp, ref_lp = jax.jit(fast)(params, lora_w), jax.jit(plain)(params, lora_w)
        assert float(jnp.min(jnp.abs(jnp.where(needed, ref_lp, 1.0)))) > 1e-3  # all live
        assert float(jnp.max(jnp.abs(jnp.where(needed, lp - ref_lp, 0.0)))) < 1e-12
        grads = jax.jit(jax.grad(loss(fast), argnum))(params, lora_w)
        ref_grads = jax.jit(jax.grad(loss(plain), argnum))(params, lora_w)
        assert _max_rel_diff(ref_grads, grads) < 1e-10
        # Nothing needed: every chunk is skipped.
        nothing = tf.token_logprobs(config, params, tokens, positions_BxT=pos, segment_ids_BxT=seg,
                                    needed_BxT=jnp.zeros_like(needed))
        assert not np.any(np.asarray(nothing))


@pytest.mark.parametrize("T,chunk", [(19, 0), (19, 5), (40, 16)])
def test_blocked_attention_matches_dense_autodiff(T, chunk):
    """Values and (q, k, v) gradients of the blocked attention with its own backward pass, against
    jax.grad of dense masked attention: packed segments, padding, grouped-query heads."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(T + chunk)
        B, H, Hk, Dh = 2, 6, 2, 8
        q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, Dh))) for n in (H, Hk, Hk))
        seg = np.ones((B, T), np.int32)
        seg[0, T // 3:] = 2
        seg[0, -3:] = 0
        # Row 1 is a tree: a prefix (segment 1), then two branches (2, 3) that also see it.
        pre = np.zeros((B, T), np.int32)
        seg[1, :T // 4], seg[1, T // 4:T // 2], seg[1, T // 2:] = 1, 2, 3
        pre[1, T // 4:] = 1
        seg, pre = jnp.asarray(seg), jnp.asarray(pre)
        w = jnp.asarray(rng.normal(size=(B, T, H * Dh)))
        mask = plain_mask(seg, pre)

        def blocked(q, k, v):
            return jnp.sum(w * tf.causal_attention(q, k, v, seg, chunk, pre))

        def dense(q, k, v):
            return jnp.sum(w * tf.attention(q, k, v, mask))

        (value, grads), (ref, ref_grads) = (jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)
                                            for f in (blocked, dense))
        assert abs(float(value - ref)) < 1e-12 * abs(float(ref))
        assert _max_rel_diff(ref_grads, grads) < 1e-12


def test_blocked_attention_fp32_and_bf16():
    """The same in fp32 (rounding ~1e-6) and bf16 (inputs bf16, scores and softmax fp32)."""
    rng = np.random.default_rng(0)
    B, T, H, Hk, Dh = 1, 64, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, Dh)), jnp.float32) for n in (H, Hk, Hk))
    seg = jnp.ones((B, T), jnp.int32)
    mask = plain_mask(seg)
    w = jnp.asarray(rng.normal(size=(B, T, H * Dh)), jnp.float32)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):  # measured 1e-6, 4e-3
        args = [x.astype(dtype) for x in (q, k, v)]
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(w * tf.causal_attention(*a, seg, 16)),
                                 (0, 1, 2)))(*args)
        ref = jax.jit(jax.grad(lambda *a: jnp.sum(w * tf.attention(*a, mask)), (0, 1, 2)))(
            *[x.astype(jnp.float32) for x in args])
        assert all(g.dtype == dtype for g in grads)
        assert _max_rel_diff(ref, [g.astype(jnp.float32) for g in grads]) < tol
