"""A paged KV-cache sampling engine that runs on the learner's own (sharded) params.

Memory follows the tokens held. The cache is a pool of fixed-size pages (k, v: L x P x page_size
x Hk x Dh; pages sharded over the data-parallel mesh axes, kv heads over "tensor"), as in vLLM.
Each of the S slots (one episode each) has a page table: its conversation position p lives in
page table[slot, p // page_size] at offset p % page_size. Pages are handed out as an episode
grows and returned when it ends; the pool starts at one short bucket per slot and doubles when
it runs out, up to S x max_len positions (in whole pages: the reservation of a cache without
pages), so at its peak it holds at most twice the pages in use.
Params and LoRA are passed to every call, so the learner can update them between calls with no
weight sync; on CPU the engine also keeps them split per layer (Layers, below), remade whenever
it is handed other arrays.

Driving it (the environment loop):

    engine = SamplingEngine(config, num_slots=S, max_len=M, mesh=mesh, stop_ids=(eos, eot))
    engine.reset_prefix_cache()                          # whenever params changed since last use
    engine.add(slot, prompt_ids, key=episode_key)        # a free slot starts an episode
    while work:
        for g in engine.step(params, lora):              # prefill + up to `decode_steps` tokens
            ...g.slot, g.ids, g.logps, g.stop_reason...  # a finished turn; the slot now waits
            engine.add(g.slot, reply_ids)                # env reply -> the slot's next turn
            # or engine.free(g.slot) and later engine.add(g.slot, ids, key=new_key)
    engine.generate(params, lora) -> list[Generation]    # step() until no slot is busy

`add` queues tokens and asks for a reply; the last token of the previous turn (its stop token,
already returned in `ids`) is put in the cache in front of them, so the conversation the learner
scores is exactly prompt + ids + reply + ids + ... with no re-tokenization. Each `step` prefills
the queued tokens of every slot that has some (chunks of `prefill_chunk` tokens) and then runs ONE
jitted on-device loop (`lax.while_loop`) of at most `decode_steps` decode steps over every busy
slot, leaving early once all of them stopped; finished turns come back, and their slots can be
refilled while the others keep decoding (continuous batching). A turn stops at a stop id
("stop"), after its `max_new_tokens` ("max_new_tokens"), or when the slot's context is full
("context_full"; the slot then takes no more tokens). `free` returns the slot's pages; a page is
always written by its episode (or by the episode whose prompt it caches) before it is read.

Prefix cache (`share_prompts`, on by default): every full page of a new episode's prompt is
entered in a tree keyed by its tokens and the page before it. A new episode whose prompt starts
with pages already there maps them into its table (shared, reference-counted, never written
again) and prefills only the rest. Within one prefill, episodes whose next page another new
episode computes wait for it (a second round), so LOOP's K rollouts of a task compute their
prompt once, and the system prompt and worked example common to every episode are computed once
per collection. Cached keys and values belong to the params that computed them: call
`reset_prefix_cache()` when params change (`collect` does, at its start). `prefill_tokens`
counts the prompt tokens computed, `prefill_shared_tokens` those mapped from the cache. A mapped
page holds what the episode would have computed, up to the last float bit that a prefill of
another batch shape can round differently.

Static shapes: each jitted call works on a bucket of rows (the busy slots' page tables, row count
rounded up to a power of two) and a power-of-two window of cache positions (>= the longest busy
slot + the steps to run), gathered out of the pool and written back page by page (pages a call
does not write are not written back). A run compiles at most log2(S) x log2(max_len) x
log2(pool growth) decode programs and log2(prefill_chunk) times that prefill programs, whatever
the prompt lengths (compiled programs are shared by engines of the same config;
`loopjax.sampling.engine.TRACES` counts the traces). The pool is donated.

Layers: on CPU the prefill and decode programs run on the params in the sampler's layout
(`sampler_layout`): split into per-layer arrays, their layers unrolled (a layer scan would have
XLA:CPU copy every layer's weights out of the stack at every decoded token), and each fp32
kernel stored transposed, F x D (XLA:CPU multiplies a decode step's few rows by it 1.1-1.9x
faster, `matmul_t`). The engine makes that copy when it is given params it has not laid out yet
and keeps it while they are the same arrays: one more copy of the model in memory. Elsewhere, or
with `unroll_layers=False`, the layers are a scan over the params as given: no copy, and a
compile time that does not grow with depth.

Randomness: every episode has its own key (given to `add` when the slot is free). The token at
conversation position p (0-based, counting every prompt / reply / generated token of the episode)
is drawn with `fold_in(episode_key, p)`. Draws therefore do not depend on which other slots are
busy, on how turns are grouped into steps, or on the slot number. (The logits themselves can
differ in the last float bits between batch shapes, so a near-tie can still flip.)

Log-probs: `logps[i]` = log_softmax(logits / T)[ids[i]] for the row's temperature T, the quantity
`token_logprobs(config, params, conversation, lora=lora, temperature=T)` recomputes (see
loopjax.sampling.sample for greedy and top-k / top-p). Measured difference to that full-forward
recompute over a 4-turn conversation with LoRA active (tests/test_sampling.py, CPU): 4.8e-7 and
1.4e-6 with fp32 params (temperature 0.7 and 1; the decode's transposed kernels sum in another
order); 9.5e-7 with bf16 params and bf16 cache (both paths run the same bf16 projections and
round the same bf16 k/v, and XLA:CPU accumulates bf16 dots in fp32; GPU/TPU kernels may differ
by more).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from loopjax.models.config import ModelConfig
from loopjax.models.transformer import (KVCache, acc_dtype, forward, hidden_states,
                                         sampler_layout)
from loopjax.sampling.sample import sample_tokens

STOP, MAX_NEW, CONTEXT_FULL = "stop", "max_new_tokens", "context_full"
_FREE, _QUEUED, _DECODING, _WAITING, _FULL = "free", "queued", "decoding", "waiting", "full"


@dataclasses.dataclass
class Generation:
    """One finished turn of one slot: sampled ids (stop id included) and their log-probs."""
    slot: int
    ids: np.ndarray  # int32, the generated tokens in order
    logps: np.ndarray  # fp32, log-prob of each generated token under the sampled distribution
    stop_reason: str  # "stop" | "max_new_tokens" | "context_full"


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _fit(spec: P, shape, mesh) -> P:
    """Drops mesh axes that do not divide their dimension (as loopjax.sharding does for params)."""
    out = []
    for dim, axis in zip(shape, spec):
        size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
        out.append(axis if dim % size == 0 else None)
    return P(*out)


NO_PAGE = np.int32(2**30)  # a page-table entry with no page: reads zeros, writes nothing


class SamplingEngine:
    """S slots over a paged KV cache; see the module docstring for how to drive it."""

    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, *, mesh=None,
                 stop_ids=(), cache_dtype=None, prefill_chunk: int = 512, decode_steps: int = 32,
                 min_len_bucket: int = 64, top_k: int = 0, top_p: float = 1.0,
                 share_prompts: bool = True, page_size: int = 32,
                 unroll_layers: bool | None = None):
        if num_slots <= 0 or max_len <= 1:
            raise ValueError(f"num_slots ({num_slots}) must be >= 1 and max_len ({max_len}) >= 2")
        if prefill_chunk <= 0 or decode_steps <= 0 or page_size <= 0:
            raise ValueError(f"prefill_chunk ({prefill_chunk}), decode_steps ({decode_steps}) and "
                             f"page_size ({page_size}) must be positive")
        if not 0.0 < top_p <= 1.0 or top_k < 0:
            raise ValueError(f"top_p must be in (0, 1] and top_k >= 0 (0 = off); got {top_p}, {top_k}")
        self.config, self.num_slots, self.max_len, self.mesh = config, num_slots, max_len, mesh
        self.prefill_chunk, self.decode_steps = _pow2(prefill_chunk), decode_steps
        self.page_size = _pow2(page_size)
        self.min_len_bucket = max(_pow2(min_len_bucket), self.page_size)
        self.top_k, self.top_p, self.share_prompts = top_k, top_p, share_prompts
        if unroll_layers is None:  # XLA:CPU copies stacked weights' slices: unroll there (Layers)
            platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
            unroll_layers = platform == "cpu"
        self.unroll_layers = bool(unroll_layers)
        self._split = None  # (the params' and LoRA's leaves, their per-layer split) if unrolled
        # Prompt tokens put in the cache by a prefill, and those mapped from the prefix cache.
        self.prefill_tokens, self.prefill_shared_tokens = 0, 0
        self.stop_ids = np.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], np.int32)
        # fp32 log-probs, float64 for a float64 model (numerics checks under JAX's x64 mode).
        self._logp_dtype = np.float64 if config.dtype == "float64" else np.float32
        self.cache_dtype = jnp.dtype(cache_dtype or config.jnp_dtype)
        self.min_rows, self._dp = 1, 1
        if mesh is not None:
            self._dp = mesh.shape["data"] * mesh.shape["fsdp"]
            self.min_rows = min(self._dp, _pow2(num_slots))  # row buckets split evenly over dp
        # The page pool (device) and its bookkeeping (host, authoritative).
        self.pages_per_slot = -(-max_len // self.page_size)
        self.max_pages = self._round(num_slots * self.pages_per_slot)  # every slot full
        self.k = self.v = None
        first = num_slots * -(-min(self.min_len_bucket, max_len) // self.page_size)
        self._grow(self._pool_size(first))  # one shortest bucket per slot
        self.table = np.full((num_slots, self.pages_per_slot), NO_PAGE, np.int32)
        self.held = np.zeros(num_slots, np.int64)  # pages in each slot's table
        # Most pages referenced at once since it was last set to 0 (what an exact pool would need).
        self.peak_pages = 0
        # Prefix cache: (page before it or -1, its tokens) -> page; pages it holds stay out of the
        # free list until reset. Per slot: the prompt (tokens to cache) of a starting episode and
        # the page its matched / registered prefix ends in.
        self._prefix: dict[tuple[int, tuple[int, ...]], int] = {}
        self._cached = np.zeros(self.num_pages, bool)
        self._prompt: list[list[int] | None] = [None] * num_slots
        self._node = np.full(num_slots, -1, np.int64)
        # Host-side state per slot.
        self.lengths = np.zeros(num_slots, np.int64)  # cache positions holding this episode's tokens
        self.status = [_FREE] * num_slots
        self.queued: list[list[int]] = [[] for _ in range(num_slots)]  # tokens waiting for prefill
        self.next_input = np.zeros(num_slots, np.int32)  # last token, not yet in the cache
        self.keys = None  # per-slot key data, allocated on the first add (its shape is the impl's)
        self.temperature = np.ones(num_slots, np.float32)
        self.max_new = np.zeros(num_slots, np.int64)
        self.out_ids: list[list[np.ndarray]] = [[] for _ in range(num_slots)]
        self.out_logps: list[list[np.ndarray]] = [[] for _ in range(num_slots)]

    # ------------------------------------------------------------------------- pages

    @property
    def num_pages(self) -> int:
        return int(self.k.shape[1])

    def token_bytes(self) -> int:
        """Bytes of k and v one cached token takes (all layers)."""
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.cache_dtype.itemsize

    def pages_bytes(self, pages: int) -> int:
        """Bytes of k and v in `pages` pages."""
        return pages * self.page_size * self.token_bytes()

    def cache_bytes(self) -> int:
        """Bytes the page pool holds now."""
        return self.pages_bytes(self.num_pages)

    def _round(self, n: int) -> int:
        """n rounded up to a multiple of the data-parallel size (pages split evenly over it)."""
        return -(-n // self._dp) * self._dp

    def _pool_size(self, n: int) -> int:
        """The pool for n pages: a power of two (bounded compiles), at most every slot full."""
        return min(self._round(_pow2(n)), self.max_pages)

    def _grow(self, num_pages: int):
        """Pool of `num_pages` pages (a power of two), keeping the pages there are."""
        c = self.config
        shape = (c.num_layers, num_pages, self.page_size, c.num_kv_heads, c.head_dim)
        old = 0 if self.k is None else self.num_pages
        sharding = None
        if self.mesh is not None:
            spec = P(None, ("data", "fsdp"), None, "tensor", None)
            sharding = NamedSharding(self.mesh, _fit(spec, shape, self.mesh))
        if self.k is None:
            zeros = jax.jit(lambda: jnp.zeros(shape, self.cache_dtype), out_shardings=sharding)
            self.k, self.v = zeros(), zeros()
            self._free = list(range(num_pages - 1, -1, -1))
            self._refs = np.zeros(num_pages, np.int64)
            return
        pad = jax.jit(lambda x: jnp.pad(x, ((0, 0), (0, num_pages - old), (0, 0), (0, 0), (0, 0))),
                      out_shardings=sharding)
        self.k, self.v = pad(self.k), pad(self.v)
        self._free = list(range(num_pages - 1, old - 1, -1)) + self._free
        self._refs = np.concatenate([self._refs, np.zeros(num_pages - old, np.int64)])
        self._cached = np.concatenate([self._cached, np.zeros(num_pages - old, bool)])

    def _release(self, page: int):
        self._refs[page] -= 1
        if self._refs[page] == 0 and not self._cached[page]:
            self._free.append(page)

    def _map(self, slot: int, page: int):
        self.table[slot, self.held[slot]] = page
        self.held[slot] += 1
        self._refs[page] += 1

    def _ensure(self, slot: int, positions: int):
        """Pages in the slot's table for conversation positions [0, positions)."""
        need = min(-(-positions // self.page_size), self.pages_per_slot) - self.held[slot]
        if need <= 0:
            return
        if len(self._free) < need and self.num_pages < self.max_pages:
            # Grow before evicting: which pages are shared then never depends on the pool's size
            # (a resumed run's fresh pool draws the same tokens as the run it continues).
            self._grow(self._pool_size(self.num_pages - len(self._free) + need))
        if len(self._free) < need:  # the pool is as large as every slot full: drop the cache
            self.reset_prefix_cache()
        for _ in range(need):
            self._map(slot, self._free.pop())
        self.peak_pages = max(self.peak_pages, int(np.sum(self._refs > 0)))

    def reset_prefix_cache(self):
        """Forgets every cached prompt page (call it when params change)."""
        self._prefix.clear()
        self._cached[:] = False
        self._free = [p for p in range(self.num_pages - 1, -1, -1) if self._refs[p] == 0]
        self._prompt = [None] * self.num_slots

    def _lookup(self, slot: int, todo: list[int]) -> list[int]:
        """Maps the cached pages that continue the slot's prompt; returns the tokens left."""
        ps = self.page_size
        while self._prompt[slot] is not None and len(todo) >= ps and self.lengths[slot] % ps == 0:
            page = self._prefix.get((int(self._node[slot]), tuple(todo[:ps])))
            if page is None:
                break
            self._map(slot, page)
            self._node[slot] = page
            self.lengths[slot] += ps
            self.prefill_shared_tokens += ps
            todo = todo[ps:]
        return todo

    def _next_key(self, slot: int, todo: list[int]):
        """The prefix-cache key of the next page a starting episode would compute, else None."""
        ps = self.page_size
        if self._prompt[slot] is None or len(todo) < ps or self.lengths[slot] % ps:
            return None
        return int(self._node[slot]), tuple(todo[:ps])

    def _register(self, slot: int):
        """Enters the full pages of a starting episode's (now cached) prompt in the prefix cache."""
        prompt, ps = self._prompt[slot], self.page_size
        for j in range(len(prompt) // ps):
            page = int(self.table[slot, j])
            key = (int(self.table[slot, j - 1]) if j else -1, tuple(prompt[j * ps:(j + 1) * ps]))
            if key not in self._prefix:
                self._prefix[key] = page
                self._cached[page] = True
        self._prompt[slot] = None

    # ------------------------------------------------------------------------- slot management

    def add(self, slot: int, token_ids, *, key=None, max_new_tokens: int = 1500,
            temperature: float = 1.0):
        """Queues new tokens for `slot` and asks for a reply (temperature 0 = greedy).

        A free slot starts a new episode and needs `key` (the episode's PRNG key); a slot whose
        turn finished continues its episode (pass no key).
        """
        self._check_slot(slot)
        ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]
        if any(t < 0 or t >= self.config.vocab_size for t in ids):
            raise ValueError(f"slot {slot}: token ids must be in [0, {self.config.vocab_size})")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        status = self.status[slot]
        if status == _FREE:
            if key is None:
                raise ValueError(f"slot {slot} is free: starting an episode needs key=<its PRNG key>")
            if not ids:
                raise ValueError(f"slot {slot}: a new episode needs at least one prompt token")
            is_typed = jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key)
            data = np.asarray(jax.random.key_data(key) if is_typed else key)
            if self.keys is None:
                self.keys = np.zeros((self.num_slots,) + data.shape, data.dtype)
            self.keys[slot] = data
            self._drop_pages(slot)
            self._prompt[slot] = ids[:-1] if self.share_prompts else None  # what gets cached
            self._node[slot] = -1
            tokens = ids
        elif status == _WAITING:
            if key is not None:
                raise ValueError(f"slot {slot} is mid-episode; free() it before starting a new one")
            tokens = [int(self.next_input[slot])] + ids
        elif status == _FULL:
            raise ValueError(f"slot {slot}'s context ({self.max_len} tokens) is full; free() it")
        else:
            raise ValueError(f"slot {slot} is still {status}; wait for its turn to finish")
        if self.lengths[slot] + len(tokens) >= self.max_len:
            raise ValueError(f"slot {slot}: {self.lengths[slot]} cached + {len(tokens)} new tokens "
                             f"leave no room to generate within max_len={self.max_len}")
        self.queued[slot] = tokens
        self.status[slot] = _QUEUED
        self.temperature[slot] = temperature
        self.max_new[slot] = max_new_tokens
        self.out_ids[slot], self.out_logps[slot] = [], []

    def free(self, slot: int):
        """Ends the slot's episode; the slot can start a new one (its old cache is never read)."""
        self._check_slot(slot)
        self.status[slot] = _FREE
        self._drop_pages(slot)
        self.queued[slot], self.out_ids[slot], self.out_logps[slot] = [], [], []

    def _drop_pages(self, slot: int):
        for page in self.table[slot, :self.held[slot]]:
            self._release(int(page))
        self.table[slot], self.held[slot], self.lengths[slot] = NO_PAGE, 0, 0
        self._prompt[slot] = None

    def length(self, slot: int) -> int:
        """Tokens of the slot's episode so far (cached + queued + the last generated one)."""
        pending = len(self.queued[slot]) if self.status[slot] == _QUEUED else 0
        extra = 1 if self.status[slot] in (_DECODING, _WAITING, _FULL) else 0
        return int(self.lengths[slot]) + pending + extra

    def busy(self) -> list[int]:
        return [s for s in range(self.num_slots) if self.status[s] in (_QUEUED, _DECODING)]

    def _check_slot(self, slot):
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")

    # ------------------------------------------------------------------------- running

    def step(self, params, lora=None) -> list[Generation]:
        """Prefills queued slots, then decodes busy slots for up to `decode_steps` tokens."""
        queued = [s for s in range(self.num_slots) if self.status[s] == _QUEUED]
        if queued:
            self._prefill(params, lora, queued)
        decoding = [s for s in range(self.num_slots) if self.status[s] == _DECODING]
        return self._decode(params, lora, decoding) if decoding else []

    def generate(self, params, lora=None) -> list[Generation]:
        """step() until no slot is queued or decoding; finished turns sorted by slot."""
        done = []
        while self.busy():
            done += self.step(params, lora)
        return sorted(done, key=lambda g: g.slot)

    def _table(self, slots, positions: int):
        """The busy rows' page tables over a window of `positions`, padded to a power-of-two row
        bucket with rows of no pages."""
        n = min(_pow2(len(slots), self.min_rows), max(self.num_slots, self.min_rows))
        table = np.full((n, -(-positions // self.page_size)), NO_PAGE, np.int32)
        table[:len(slots)] = self.table[slots, :table.shape[1]]
        return table

    def _len_bucket(self, needed: int) -> int:
        return min(_pow2(needed, self.min_len_bucket), self.max_len)

    def _prefill(self, params, lora, slots):
        # Every queued token but the last goes into the cache here; the last is the first decode
        # step's input, so the first sampled token comes from the same decode program as the rest.
        todo = {s: self.queued[s][:-1] for s in slots}
        for s in slots:
            self.next_input[s] = self.queued[s][-1]
            self.queued[s] = []
            self.status[s] = _DECODING
        while todo:  # rounds: a starting episode whose next page another one computes waits
            run, later, claimed = [], {}, set()
            for s in todo:
                todo[s] = self._lookup(s, todo[s])
                key = self._next_key(s, todo[s])
                if key is not None and key in claimed:
                    later[s] = todo[s]
                else:
                    run.append(s)
                    claimed.add(key)
            self._prefill_round(params, lora, {s: todo[s] for s in run})
            for s in run:
                if self._prompt[s] is not None:
                    self._register(s)
            todo = later

    def _prefill_round(self, params, lora, todo):
        slots = [s for s in todo if todo[s]]
        self.prefill_tokens += sum(len(todo[s]) for s in slots)
        C = self.prefill_chunk
        while slots and any(todo[s] for s in slots):
            longest = max(len(todo[s]) for s in slots)
            T = min(_pow2(longest, 16), C)
            n = len(slots)
            tokens, seg = np.zeros((n, T), np.int32), np.zeros((n, T), np.int32)
            lengths = self.lengths[slots].astype(np.int32)
            for i, s in enumerate(slots):
                chunk, todo[s] = todo[s][:T], todo[s][T:]
                tokens[i, :len(chunk)], seg[i, :len(chunk)] = chunk, 1
                self._ensure(s, int(lengths[i]) + len(chunk))
            window = self._len_bucket(int((lengths + seg.sum(1)).max()))
            table = self._table(slots, window)
            pad = table.shape[0] - n
            self.k, self.v = self._prefill_call(
                params, lora, k=self.k, v=self.v, table=table,
                tokens=np.pad(tokens, ((0, pad), (0, 0))), seg=np.pad(seg, ((0, pad), (0, 0))),
                lengths=np.pad(lengths, (0, pad)))
            self.lengths[slots] += seg.sum(1)

    def _decode(self, params, lora, slots) -> list[Generation]:
        steps = self.decode_steps
        budget = np.array([min(self.max_new[s] - sum(len(x) for x in self.out_ids[s]),
                               # a sampled token sits at position lengths + 1 + (steps so far);
                               # the last one that fits is at max_len - 1
                               self.max_len - 1 - self.lengths[s]) for s in slots], np.int32)
        for s, b in zip(slots, budget):  # the call writes positions [lengths, lengths + steps)
            self._ensure(s, int(self.lengths[s]) + min(steps, int(b)))
        lengths = self.lengths[slots].astype(np.int32)
        window = self._len_bucket(int(lengths.max()) + min(steps, int(budget.max())))
        table = self._table(slots, window)
        pad = table.shape[0] - len(slots)
        keys = self.keys[slots]
        self.k, self.v, out_ids, out_logps, n_out = self._decode_call(
            params, lora, k=self.k, v=self.v, table=table,
            tokens=np.pad(self.next_input[slots], (0, pad)), lengths=np.pad(lengths, (0, pad)),
            keys=np.pad(keys, ((0, pad),) + ((0, 0),) * (keys.ndim - 1)),
            temperature=np.pad(self.temperature[slots], (0, pad), constant_values=1.0),
            budget=np.pad(budget, (0, pad)), stop_ids=self.stop_ids, num_steps=steps)
        out_ids, out_logps, n_out = np.asarray(out_ids), np.asarray(out_logps), np.asarray(n_out)
        finished = []
        for i, s in enumerate(slots):
            k = int(n_out[i])
            ids, lps = out_ids[i, :k], out_logps[i, :k]
            self.out_ids[s].append(ids)
            self.out_logps[s].append(lps)
            self.lengths[s] += k  # the inputs fed: the previous last token and all new but the last
            if k:
                self.next_input[s] = ids[-1]
            made = sum(len(x) for x in self.out_ids[s])
            if k and ids[-1] in self.stop_ids:
                reason = STOP
            elif made >= self.max_new[s]:
                reason = MAX_NEW
            elif self.lengths[s] + 1 >= self.max_len:
                reason = CONTEXT_FULL
            else:
                continue
            self.status[s] = _FULL if reason == CONTEXT_FULL else _WAITING
            finished.append(Generation(s, np.concatenate(self.out_ids[s]).astype(np.int32),
                                       np.concatenate(self.out_logps[s]).astype(self._logp_dtype),
                                       reason))
            self.out_ids[s], self.out_logps[s] = [], []
        return finished

    def _prefill_call(self, params, lora, **kw):
        params, lora = self._layers(params, lora)
        return _prefill_program(params, lora, config=self.config, **kw)

    def _decode_call(self, params, lora, **kw):
        params, lora = self._layers(params, lora)
        return _decode_program(params, lora, config=self.config, top_k=self.top_k,
                               top_p=self.top_p, **kw)

    def _layers(self, params, lora):
        """The params the programs run on: as given, or (unroll_layers) in the sampler's layout,
        which the engine keeps while the params are the same arrays."""
        if not self.unroll_layers:
            return params, lora
        leaves = jax.tree.leaves((params, lora))
        if (self._split is None or len(self._split[0]) != len(leaves)
                or any(a is not b for a, b in zip(self._split[0], leaves))):
            self._split = None  # the old split's memory goes first
            self._split = (leaves, *_layout_program(params, lora))
        return self._split[1], self._split[2]


# ----------------------------------------------------------------------------- jitted programs
# Module-level, keyed on the (hashable) config, so engines of the same model share compiled code.

TRACES = collections.Counter()  # how many times each program was traced (= compiled)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("k", "v"))
def _prefill_program(params, lora, *, config, k, v, table, tokens, seg, lengths):
    TRACES["prefill"] += 1  # runs once per trace
    # The layer scan reads each layer's pages of the rows and writes the new tokens into the pool.
    cache = KVCache(k, v, lengths, table)
    # hidden_states, not forward: the prefill needs no logits (the unembedding is skipped).
    _, cache = hidden_states(config, params, tokens, segment_ids_BxT=seg, lora=lora, cache=cache)
    return cache.k_LxBxSxHkxDh, cache.v_LxBxSxHkxDh


_layout_program = jax.jit(sampler_layout)


@functools.partial(jax.jit, static_argnames=("config", "top_k", "top_p", "num_steps"),
                   donate_argnames=("k", "v"))
def _decode_program(params, lora, *, config, top_k, top_p, k, v, table, tokens, lengths, keys,
                    temperature, budget, stop_ids, num_steps):
    """`num_steps` decode steps (fewer once every row stopped); params stacked or split into
    layers (`sampler_layout`, then the layers run unrolled)."""
    TRACES["decode"] += 1
    B = table.shape[0]
    episode_keys = jax.random.wrap_key_data(keys)
    state = dict(k=k, v=v, lengths=lengths, tokens=tokens, active=budget > 0, step=jnp.int32(0),
                 n_out=jnp.zeros(B, jnp.int32), ids=jnp.zeros((B, num_steps), jnp.int32),
                 logps=jnp.zeros((B, num_steps), acc_dtype(config.dtype)))

    def cond(st):
        return (st["step"] < num_steps) & jnp.any(st["active"])

    def body(st):
        active = st["active"]
        cache = KVCache(st["k"], st["v"], st["lengths"], table)
        logits, cache = forward(config, params, st["tokens"][:, None], lora=lora,
                                segment_ids_BxT=active[:, None].astype(jnp.int32), cache=cache)
        # The sampled token's conversation position is the input's position + 1.
        step_keys = jax.vmap(jax.random.fold_in)(episode_keys, st["lengths"] + 1)
        tok, logp = sample_tokens(logits[:, 0], step_keys, temperature, top_k=top_k, top_p=top_p)
        n_out = st["n_out"] + active
        stopped = jnp.any(tok[:, None] == stop_ids[None, :], axis=1) | (n_out >= budget)
        write = (jnp.arange(num_steps)[None, :] == st["step"]) & active[:, None]
        return dict(k=cache.k_LxBxSxHkxDh, v=cache.v_LxBxSxHkxDh, lengths=cache.lengths_B,
                    tokens=jnp.where(active, tok, st["tokens"]), active=active & ~stopped,
                    step=st["step"] + 1, n_out=n_out,
                    ids=jnp.where(write, tok[:, None], st["ids"]),
                    logps=jnp.where(write, logp[:, None], st["logps"]))

    st = jax.lax.while_loop(cond, body, state)
    return st["k"], st["v"], st["ids"], st["logps"], st["n_out"]


def generate(config: ModelConfig, params, prompts, *, key, lora=None, max_new_tokens: int = 1500,
             stop_ids=(), temperature: float = 1.0, mesh=None, max_len: int | None = None,
             **engine_kwargs) -> list[Generation]:
    """One reply per prompt (a list of token-id lists); prompt i's episode key is fold_in(key, i)."""
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    max_len = max_len or longest + max_new_tokens + 1
    engine = SamplingEngine(config, len(prompts), max_len, mesh=mesh, stop_ids=stop_ids,
                            **engine_kwargs)
    for i, prompt in enumerate(prompts):
        engine.add(i, prompt, key=jax.random.fold_in(key, i), max_new_tokens=max_new_tokens,
                   temperature=temperature)
    return engine.generate(params, lora)
