"""The KV cache of the sampling path: contiguous or paged, and one layer's write and read of it.

`KVCache` is what `hidden_states` takes and returns; `LayerCache` is what one block gets of it
(the whole cache, and which layer and positions are its own).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from loopjax.models.config import ModelConfig


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


class LayerCache(NamedTuple):
    """The whole cache (KVCache's arrays: contiguous, or a pool of pages with `page_table_BxN`) and
    the layer one block reads and writes: its new tokens go to positions `write_idx_BxT` of layer
    `layer_idx`. The whole [L, ...] cache is carried through the layer scan and this layer's
    entries are written in place (a per-layer cache as scan input/output would copy it every
    call)."""
    k_LxBxSxHkxDh: jax.Array
    v_LxBxSxHkxDh: jax.Array
    write_idx_BxT: jax.Array
    layer_idx: jax.Array | int
    page_table_BxN: jax.Array | None = None


def write_and_read(c: LayerCache, k_BxTxHkxDh, v_BxTxHkxDh):
    """(c with the new keys and values written into its layer, that layer's keys and values of
    every cache position: B x S x Hk x Dh each)."""
    B, _, Hk, Dh = k_BxTxHkxDh.shape
    cache_k, cache_v, layer_idx = c.k_LxBxSxHkxDh, c.v_LxBxSxHkxDh, c.layer_idx
    write_idx_BxT, table_BxN = c.write_idx_BxT, c.page_table_BxN
    if table_BxN is None:
        where = (jnp.arange(B)[:, None], write_idx_BxT)
    else:  # (page, offset) of each new token; positions past the table have no page
        page = cache_k.shape[2]
        where = (jnp.take_along_axis(table_BxN, write_idx_BxT // page, axis=1, mode="fill",
                                     fill_value=cache_k.shape[1]), write_idx_BxT % page)
    # mode="drop": a write past the cache end is dropped, never clamped onto real entries.
    cache_k = cache_k.at[(layer_idx, *where)].set(k_BxTxHkxDh.astype(cache_k.dtype), mode="drop")
    cache_v = cache_v.at[(layer_idx, *where)].set(v_BxTxHkxDh.astype(cache_v.dtype), mode="drop")
    if table_BxN is None:
        k, v = cache_k[layer_idx], cache_v[layer_idx]
    else:  # this layer's pages of each row, in position order: one gather from the pool
        k, v = (x.at[layer_idx, table_BxN].get(mode="fill", fill_value=0)
                .reshape(B, -1, Hk, Dh) for x in (cache_k, cache_v))
    return c._replace(k_LxBxSxHkxDh=cache_k, v_LxBxSxHkxDh=cache_v), k, v
