"""LoRA: low-rank adapters kept as their own pytree, apart from the frozen base weights.

W_eff = W + scale * A B with A in x r, B r x out, scale = alpha / r. A starts like PEFT's
(kaiming-uniform, bound 1/sqrt(in)), B at zero, so a fresh adapter leaves the model unchanged.
Weights are stacked over layers like the base: weights[name]["a"] is L x in x r.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from loopjax.config import LoraConfig
from loopjax.models.config import ModelConfig
from loopjax.models.transformer import projection_shapes

__all__ = ["LoRA", "LoraConfig", "init_lora", "merge_lora"]


@flax.struct.dataclass
class LoRA:
    """weights: {projection: {"a": L x in x r, "b": L x r x out}}; scale is static (not trained)."""
    weights: dict
    scale: float = flax.struct.field(pytree_node=False, default=1.0)


def init_lora(config: ModelConfig, lora_config: LoraConfig, key: jax.Array,
              dtype=jnp.float32) -> LoRA:
    shapes = projection_shapes(config)
    keys = jax.random.split(key, len(lora_config.targets))
    weights = {}
    for k, name in zip(keys, lora_config.targets, strict=True):
        fan_in, fan_out = shapes[name]
        bound = 1.0 / fan_in ** 0.5
        a = jax.random.uniform(k, (config.num_layers, fan_in, lora_config.rank), jnp.float32,
                               -bound, bound)
        weights[name] = {"a": a.astype(dtype),
                         "b": jnp.zeros((config.num_layers, lora_config.rank, fan_out), dtype)}
    return LoRA(weights=weights, scale=lora_config.scale)


def merge_lora(params: dict, lora: LoRA) -> dict:
    """Base params with scale * A B added to each adapted kernel (a new pytree; inputs
    untouched)."""
    layers = dict(params["layers"])
    for name, ab in lora.weights.items():
        kernel = layers[name]["kernel"]
        delta = lora.scale * jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32),
                                        ab["b"].astype(jnp.float32))
        layers[name] = dict(layers[name],
                            kernel=(kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    return dict(params, layers=layers)
