"""The sampler's KV cache as a pool of fixed-size pages, and each slot's page table into it.

The pool holds k and v (L x P x page_size x Hk x Dh each; pages sharded over the data-parallel
mesh axes, kv heads over "tensor"), as in vLLM. Slot s's conversation position p lives in page
`table[s, p // page_size]` at offset p % page_size; an entry of NO_PAGE reads zeros and writes
nothing. The device arrays hold the data; which page is free, how many tables hold it and whether
the prefix cache keeps it are host-side and authoritative.

Pages are handed out as an episode grows and come back when no table holds them and the prefix
cache does not keep them (`pin`). The pool starts at the size its creator asks for and doubles
when it runs out, up to `max_pages` (every slot full: the reservation of a cache without pages),
so at its peak it holds at most twice the pages in use. Sizes are powers of two (a bounded number
of compiled programs) rounded up to a multiple of the data-parallel size (pages split evenly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from loopjax.models.config import ModelConfig

NO_PAGE = np.int32(2**30)  # a page-table entry with no page: reads zeros, writes nothing


def pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= n, at least lo."""
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _fit(spec: P, shape, mesh) -> P:
    """Drops mesh axes that do not divide their dimension (as loopjax.sharding does for params)."""
    out = []
    for dim, axis in zip(shape, spec, strict=False):
        size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
        out.append(axis if dim % size == 0 else None)
    return P(*out)


class PagePool:
    """k and v pages on device; on the host the free list, reference counts, pinned pages and
    every slot's page table.

    `reserve(n)` makes n pages free if it can (growing first), `take(slot)` appends a free page
    to the slot's table, `share(slot, page)` appends a page another slot holds, `drop(slot)`
    returns the slot's pages; `pin` keeps a page out of the free list until `unpin_all`.
    """

    def __init__(self, config: ModelConfig, *, num_slots: int, max_len: int, page_size: int,
                 first_pages: int, dtype, mesh=None):
        self.config, self.page_size, self.mesh = config, page_size, mesh
        self.dtype = jnp.dtype(dtype)
        self.dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.pages_per_slot = -(-max_len // page_size)
        self.max_pages = self._round(num_slots * self.pages_per_slot)  # every slot full
        self.table = np.full((num_slots, self.pages_per_slot), NO_PAGE, np.int32)
        self.held = np.zeros(num_slots, np.int64)  # pages in each slot's table
        self.k = self.v = None
        self._grow(self.size_for(first_pages))

    # ------------------------------------------------------------------------- sizes

    @property
    def num_pages(self) -> int:
        return int(self.k.shape[1])

    def token_bytes(self) -> int:
        """Bytes of k and v one cached token takes (all layers)."""
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.dtype.itemsize

    def pages_bytes(self, pages: int) -> int:
        """Bytes of k and v in `pages` pages."""
        return pages * self.page_size * self.token_bytes()

    def in_use(self) -> int:
        """Pages some table holds."""
        return int(np.sum(self.refs > 0))

    def num_free(self) -> int:
        return len(self._free)

    def _round(self, n: int) -> int:
        """n rounded up to a multiple of the data-parallel size (pages split evenly over it)."""
        return -(-n // self.dp) * self.dp

    def size_for(self, n: int) -> int:
        """The pool for n pages: a power of two (bounded compiles), at most every slot full."""
        return min(self._round(pow2(n)), self.max_pages)

    def _grow(self, num_pages: int):
        """Pool of `num_pages` pages, keeping the pages there are."""
        c = self.config
        shape = (c.num_layers, num_pages, self.page_size, c.num_kv_heads, c.head_dim)
        old = 0 if self.k is None else self.num_pages
        sharding = None
        if self.mesh is not None:
            spec = P(None, ("data", "fsdp"), None, "tensor", None)
            sharding = NamedSharding(self.mesh, _fit(spec, shape, self.mesh))
        if self.k is None:
            zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sharding)
            self.k, self.v = zeros(), zeros()
            self._free = list(range(num_pages - 1, -1, -1))
            self.refs = np.zeros(num_pages, np.int64)  # tables holding each page
            self.pinned = np.zeros(num_pages, bool)  # kept by the prefix cache
            return
        pad = jax.jit(lambda x: jnp.pad(x, ((0, 0), (0, num_pages - old), (0, 0), (0, 0), (0, 0))),
                      out_shardings=sharding)
        self.k, self.v = pad(self.k), pad(self.v)
        self._free = list(range(num_pages - 1, old - 1, -1)) + self._free
        self.refs = np.concatenate([self.refs, np.zeros(num_pages - old, np.int64)])
        self.pinned = np.concatenate([self.pinned, np.zeros(num_pages - old, bool)])

    # ------------------------------------------------------------------------- pages

    def pages_short(self, slot: int, positions: int) -> int:
        """How many pages the slot's table lacks for conversation positions [0, positions)."""
        return int(min(-(-positions // self.page_size), self.pages_per_slot) - self.held[slot])

    def reserve(self, need: int) -> bool:
        """Grows the pool (at most to max_pages) until `need` pages are free; whether they are."""
        if len(self._free) < need and self.num_pages < self.max_pages:
            self._grow(self.size_for(self.num_pages - len(self._free) + need))
        return len(self._free) >= need

    def take(self, slot: int):
        """Appends a free page to the slot's table (`reserve` first)."""
        self.share(slot, self._free.pop())

    def share(self, slot: int, page: int):
        """Appends `page` to the slot's table."""
        self.table[slot, self.held[slot]] = page
        self.held[slot] += 1
        self.refs[page] += 1

    def drop(self, slot: int):
        """Empties the slot's table; pages no table holds and none pinned become free."""
        for page in self.table[slot, :self.held[slot]]:
            page = int(page)
            self.refs[page] -= 1
            if self.refs[page] == 0 and not self.pinned[page]:
                self._free.append(page)
        self.table[slot], self.held[slot] = NO_PAGE, 0

    def pin(self, page: int):
        self.pinned[page] = True

    def unpin_all(self):
        """Unpins every page; the free list becomes every page no table holds."""
        self.pinned[:] = False
        self._free = [p for p in range(self.num_pages - 1, -1, -1) if self.refs[p] == 0]

    def rows(self, slots, positions: int, num_rows: int) -> np.ndarray:
        """The slots' page tables over a window of `positions`, padded to `num_rows` rows of no
        pages."""
        table = np.full((num_rows, -(-positions // self.page_size)), NO_PAGE, np.int32)
        table[:len(slots)] = self.table[slots, :table.shape[1]]
        return table
