"""What a run holds in memory, estimated when it starts (the main job logs it; benchmarks print it
beside the measured peak).

- weights: the params the forward pass uses (frozen base + trainable);
- the sampler's copy: on CPU the sampling engine keeps the weights split per layer as well
  (`SamplingEngine(unroll_layers=...)`), one more copy of them;
- optimizer: the optimizer state of the trainable params;
- KV cache: the sampler's page pool (loopjax.sampling.engine) as it starts, what one cached token
  takes, and the most the pool can grow to (every slot holding max_len positions: the whole
  reservation of a cache without pages);
- activations: the learner's largest microbatch kept for the backward pass, about: per token and
  layer the residual stream, the two norms, q / k / v and the attention output, and the MLP's
  gate / up / product (4D + 2(H + Hk)Dh + 3F values), or with `remat` one layer's of those plus
  each layer's input (D values); rows x the longest update bucket tokens, in the model dtype.
  For a sampler alone: `sampler_activation_bytes`, its largest temporaries.

Totals are for the whole run, not per device: on a mesh the weights and cache are split over it.
"""

from __future__ import annotations

import dataclasses

import jax

GiB = 1 << 30


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    sampler_copy: int
    optimizer: int
    cache_now: int
    cache_bound: int
    cache_per_token: int
    activations: int

    @property
    def total_now(self) -> int:
        return (self.weights + self.sampler_copy + self.optimizer + self.cache_now
                + self.activations)

    def describe(self, activations: str = "learner activations", when: str = "at the start") -> str:
        def gb(n):
            return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"
        copy = (f" + the sampler's per-layer copy {gb(self.sampler_copy)}" if self.sampler_copy
                else "")
        return (f"weights {gb(self.weights)}{copy} + optimizer {gb(self.optimizer)} + KV cache "
                f"{gb(self.cache_now)} ({self.cache_per_token / 1024:.1f} KiB per token held; "
                f"grows with the tokens held, at most {gb(self.cache_bound)}) + {activations} "
                f"~{gb(self.activations)} = {gb(self.total_now)} {when}")


def activation_bytes(config, tokens: int, remat: bool) -> int:
    """About the bytes the backward pass keeps for `tokens` tokens (see the module docstring): for
    the largest microbatch, rows x the longest update bucket (the worst case: packing only fills
    rows)."""
    c = config
    per_layer = 4 * c.hidden_size + 2 * (c.num_heads + c.num_kv_heads) * c.head_dim \
        + 3 * c.intermediate_size
    values = (c.num_layers * c.hidden_size + per_layer) if remat else c.num_layers * per_layer
    return int(tokens * values * jax.numpy.dtype(c.jnp_dtype).itemsize)


def sampler_activation_bytes(config, rows: int, chunk: int, window: int) -> int:
    """About the largest temporaries of a sampler call: a prefill chunk's attention scores over
    the window (rows x H x chunk x window, fp32), its MLP (rows x chunk x 3F) and one decode
    step's logits (rows x V, fp32)."""
    c = config
    itemsize = jax.numpy.dtype(c.jnp_dtype).itemsize
    return int(rows * c.num_heads * chunk * window * 4 + rows * chunk * 3 * c.intermediate_size
               * itemsize + rows * c.vocab_size * 4)


def estimate(engine, weights, optimizer=None, activations: int = 0) -> MemoryEstimate:
    """The estimate for a sampling engine, the weights (a pytree: base and trainable params), the
    optimizer state (a pytree) and the learner's activations (`activation_bytes`)."""
    weight_bytes = tree_bytes(weights)
    return MemoryEstimate(
        weights=weight_bytes, optimizer=tree_bytes(optimizer),
        sampler_copy=weight_bytes if engine.unroll_layers else 0,
        cache_now=engine.cache_bytes(),
        cache_bound=engine.pages_bytes(engine.max_pages),
        cache_per_token=engine.token_bytes(), activations=activations)
