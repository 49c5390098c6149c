"""The sampler's CPU layout of the weights, and the two things that read it.

`sampler_layout` converts (params, lora) once, before the decode loop; `over_layers` runs the
layers over either layout (a scan over stacked weights, a Python loop over per-layer ones);
`matmul_t` multiplies by a transposed kernel or an embedding in XLA:CPU's fastest form for the
row count at hand. The learner keeps the stacked layout: its layer scan compiles one layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Up to this many rows, XLA:CPU multiplies an F x D matrix fastest as the transposed product.
FEW_ROWS = 32


def matmul_t(x_BxTxD, w_FxD, preferred_element_type=None):
    """x W^T, B x T x F, for W stored F x D (a transposed kernel, or an embedding).

    On few rows (a decode step's B x 1, B <= FEW_ROWS) it is computed as (W x^T)^T: XLA:CPU's dot
    with the F x D matrix on the left runs 1.1-1.9x faster there than x W^T or x W with W stored
    D x F (docs/performance.md, "Another machine, and the sampler's kernels"). On more rows, as
    x W^T, which is as fast as x W. The forms differ only in the order of rounding."""
    B, T, _ = x_BxTxD.shape
    if B * T <= FEW_ROWS:
        return jnp.einsum("fd,btd->fbt", w_FxD, x_BxTxD,
                          preferred_element_type=preferred_element_type).transpose(1, 2, 0)
    return jnp.einsum("btd,fd->btf", x_BxTxD, w_FxD, preferred_element_type=preferred_element_type)


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


def over_layers(f, carry, xs):
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
