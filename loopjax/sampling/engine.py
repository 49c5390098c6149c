"""A paged KV-cache sampling engine that runs on the learner's own (sharded) params.

S slots (one episode each) over a pool of KV pages (loopjax.sampling.pages): memory follows the
tokens held. Params and LoRA are passed to every call, so the learner can update them between
calls with no weight sync; on CPU the engine also keeps them split per layer
(loopjax.sampling.programs.Layers), remade whenever it is handed other arrays.

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
jitted on-device loop (loopjax.sampling.programs) of at most `decode_steps` decode steps over
every busy slot, leaving early once all of them stopped; finished turns come back, and their
slots can be refilled while the others keep decoding (continuous batching). A turn stops at a
stop id ("stop"), after its `max_new_tokens` ("max_new_tokens"), or when the slot's context is
full ("context_full"; the slot then takes no more tokens). `free` returns the slot's pages; a page
is always written by its episode (or by the episode whose prompt it caches) before it is read.

Prefix cache (`share_prompts`, on by default; loopjax.sampling.prefix_tree): a new episode maps
the cached full pages its prompt starts with and prefills only the rest. Within one prefill,
episodes whose next page another new episode computes wait for it (a second round), so K rollouts
of a task compute their prompt once. Call `reset_prefix_cache()` when params change (`collect`
does, at its start). `prefill_tokens` counts the prompt tokens computed, `prefill_shared_tokens`
those mapped from the cache.

The pool starts at one shortest length bucket per slot and doubles when it runs out; each call
attends to a power-of-two window of positions (>= the longest busy slot + the steps to run) of a
power-of-two bucket of rows, so the compiled programs stay few. Every episode has its own key
(given to `add` when the slot is free), and its draws do not depend on the other slots (both in
loopjax.sampling.programs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.models.config import ModelConfig
from loopjax.sampling.pages import PagePool, pow2
from loopjax.sampling.prefix_tree import PrefixTree
from loopjax.sampling.programs import TRACES, Layers, programs_for
from loopjax.sampling.slots import (
    CONTEXT_FULL,
    DECODING,
    FREE,
    FULL,
    MAX_NEW,
    QUEUED,
    STOP,
    WAITING,
    Generation,
    Slot,
)

__all__ = ["SamplingEngine", "Generation", "generate", "STOP", "MAX_NEW", "CONTEXT_FULL",
           "TRACES"]


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
            raise ValueError(f"top_p must be in (0, 1] and top_k >= 0 (0 = off); got {top_p}, "
                             f"{top_k}")
        self.config, self.num_slots, self.max_len, self.mesh = config, num_slots, max_len, mesh
        self.prefill_chunk, self.decode_steps = pow2(prefill_chunk), decode_steps
        self.page_size = pow2(page_size)
        self.min_len_bucket = max(pow2(min_len_bucket), self.page_size)
        self.top_k, self.top_p, self.share_prompts = top_k, top_p, share_prompts
        if unroll_layers is None:  # XLA:CPU copies stacked weights' slices: unroll there (Layers)
            platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
            unroll_layers = platform == "cpu"
        self.unroll_layers = bool(unroll_layers)
        self._layers = Layers(self.unroll_layers)  # the params the programs run on
        self.programs = programs_for(config)  # shared by engines of this config
        # Prompt tokens put in the cache by a prefill, and those mapped from the prefix cache.
        self.prefill_tokens, self.prefill_shared_tokens = 0, 0
        self.stop_ids = np.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], np.int32)
        # fp32 log-probs, float64 for a float64 model (numerics checks under JAX's x64 mode).
        self._logp_dtype = np.float64 if config.dtype == "float64" else np.float32
        self.cache_dtype = jnp.dtype(cache_dtype or config.jnp_dtype)
        first = num_slots * -(-min(self.min_len_bucket, max_len) // self.page_size)
        self.pool = PagePool(config, num_slots=num_slots, max_len=max_len,
                             page_size=self.page_size, first_pages=first,  # a short bucket each
                             dtype=self.cache_dtype, mesh=mesh)
        self.min_rows = min(self.pool.dp, pow2(num_slots))  # row buckets split evenly over dp
        self.tree = PrefixTree(self.page_size)
        self.slots = [Slot() for _ in range(num_slots)]
        # Most pages referenced at once since it was last set to 0 (what an exact pool would need).
        self.peak_pages = 0

    # ------------------------------------------------------------------------- pages

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def max_pages(self) -> int:
        return self.pool.max_pages

    def token_bytes(self) -> int:
        """Bytes of k and v one cached token takes (all layers)."""
        return self.pool.token_bytes()

    def pages_bytes(self, pages: int) -> int:
        """Bytes of k and v in `pages` pages."""
        return self.pool.pages_bytes(pages)

    def cache_bytes(self) -> int:
        """Bytes the page pool holds now."""
        return self.pool.pages_bytes(self.pool.num_pages)

    def _ensure(self, slot: int, positions: int):
        """Pages in the slot's table for conversation positions [0, positions)."""
        need = self.pool.pages_short(slot, positions)
        if need <= 0:
            return
        # Grow before evicting: which pages are shared then never depends on the pool's size
        # (a resumed run's fresh pool draws the same tokens as the run it continues).
        if not self.pool.reserve(need):  # the pool is as large as every slot full: drop the cache
            self.reset_prefix_cache()
        for _ in range(need):
            self.pool.take(slot)
        self.peak_pages = max(self.peak_pages, self.pool.in_use())

    def reset_prefix_cache(self):
        """Forgets every cached prompt page (call it when params change)."""
        self.tree.clear()
        self.pool.unpin_all()
        for rec in self.slots:
            rec.prompt = None

    def _lookup(self, slot: int, todo: list[int]) -> list[int]:
        """Maps the cached pages that continue the slot's prompt; returns the tokens left."""
        rec, ps = self.slots[slot], self.page_size
        while rec.prompt is not None and rec.length % ps == 0:
            page = self.tree.child(rec.node, todo)
            if page is None:
                break
            self.pool.share(slot, page)
            rec.node = page
            rec.length += ps
            self.prefill_shared_tokens += ps
            todo = todo[ps:]
        return todo

    def _next_key(self, slot: int, todo: list[int]):
        """The prefix-tree key of the next page a starting episode would compute, else None."""
        rec = self.slots[slot]
        if rec.prompt is None or rec.length % self.page_size:
            return None
        return self.tree.key(rec.node, todo)

    def _register(self, slot: int):
        """Enters the full pages of a starting episode's (now cached) prompt in the prefix tree."""
        rec = self.slots[slot]
        for page in self.tree.insert(self.pool.table[slot], rec.prompt):
            self.pool.pin(page)
        rec.prompt = None

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
        rec = self.slots[slot]
        if rec.status == FREE:
            if key is None:
                raise ValueError(f"slot {slot} is free: starting an episode needs "
                                 "key=<its PRNG key>")
            if not ids:
                raise ValueError(f"slot {slot}: a new episode needs at least one prompt token")
            is_typed = jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key)
            self.pool.drop(slot)
            rec = Slot(key=np.asarray(jax.random.key_data(key) if is_typed else key),
                       prompt=ids[:-1] if self.share_prompts else None)  # what gets cached
            tokens = ids
        elif rec.status == WAITING:
            if key is not None:
                raise ValueError(f"slot {slot} is mid-episode; free() it before starting a new one")
            tokens = [rec.next_input] + ids
        elif rec.status == FULL:
            raise ValueError(f"slot {slot}'s context ({self.max_len} tokens) is full; free() it")
        else:
            raise ValueError(f"slot {slot} is still {rec.status}; wait for its turn to finish")
        if rec.length + len(tokens) >= self.max_len:
            raise ValueError(f"slot {slot}: {rec.length} cached + {len(tokens)} new tokens "
                             f"leave no room to generate within max_len={self.max_len}")
        self.slots[slot] = dataclasses.replace(
            rec, status=QUEUED, queued=tokens, temperature=temperature, max_new=max_new_tokens,
            out_ids=[], out_logps=[])

    def free(self, slot: int):
        """Ends the slot's episode; the slot can start a new one (its old cache is never read)."""
        self._check_slot(slot)
        self.pool.drop(slot)
        self.slots[slot] = Slot()

    def length(self, slot: int) -> int:
        """Tokens of the slot's episode so far (cached + queued + the last generated one)."""
        rec = self.slots[slot]
        pending = len(rec.queued) if rec.status == QUEUED else 0
        extra = 1 if rec.status in (DECODING, WAITING, FULL) else 0
        return rec.length + pending + extra

    def busy(self) -> list[int]:
        return [s for s, rec in enumerate(self.slots) if rec.status in (QUEUED, DECODING)]

    def _check_slot(self, slot):
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")

    # ------------------------------------------------------------------------- running

    def step(self, params, lora=None) -> list[Generation]:
        """Prefills queued slots, then decodes busy slots for up to `decode_steps` tokens."""
        queued = [s for s, rec in enumerate(self.slots) if rec.status == QUEUED]
        if queued:
            self._prefill(params, lora, queued)
        decoding = [s for s, rec in enumerate(self.slots) if rec.status == DECODING]
        return self._decode(params, lora, decoding) if decoding else []

    def generate(self, params, lora=None) -> list[Generation]:
        """step() until no slot is queued or decoding; finished turns sorted by slot."""
        done = []
        while self.busy():
            done += self.step(params, lora)
        return sorted(done, key=lambda g: g.slot)

    def _table(self, slots, positions: int) -> np.ndarray:
        """The busy rows' page tables over a window of `positions`, padded to a power-of-two row
        bucket with rows of no pages."""
        rows = min(pow2(len(slots), self.min_rows), max(self.num_slots, self.min_rows))
        return self.pool.rows(slots, positions, rows)

    def _len_bucket(self, needed: int) -> int:
        return min(pow2(needed, self.min_len_bucket), self.max_len)

    def _lengths(self, slots) -> np.ndarray:
        return np.array([self.slots[s].length for s in slots], np.int32)

    def _prefill(self, params, lora, slots):
        # Every queued token but the last goes into the cache here; the last is the first decode
        # step's input, so the first sampled token comes from the same decode program as the rest.
        todo = {}
        for s in slots:
            rec = self.slots[s]
            todo[s], rec.next_input = rec.queued[:-1], rec.queued[-1]
            rec.queued, rec.status = [], DECODING
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
                if self.slots[s].prompt is not None:
                    self._register(s)
            todo = later

    def _prefill_round(self, params, lora, todo):
        slots = [s for s in todo if todo[s]]
        self.prefill_tokens += sum(len(todo[s]) for s in slots)
        while slots and any(todo[s] for s in slots):
            T = min(pow2(max(len(todo[s]) for s in slots), 16), self.prefill_chunk)
            n = len(slots)
            tokens, seg = np.zeros((n, T), np.int32), np.zeros((n, T), np.int32)
            lengths = self._lengths(slots)
            for i, s in enumerate(slots):
                chunk, todo[s] = todo[s][:T], todo[s][T:]
                tokens[i, :len(chunk)], seg[i, :len(chunk)] = chunk, 1
                self._ensure(s, int(lengths[i]) + len(chunk))
            window = self._len_bucket(int((lengths + seg.sum(1)).max()))
            table = self._table(slots, window)
            pad = table.shape[0] - n
            self.pool.k, self.pool.v = self._prefill_call(
                params, lora, k=self.pool.k, v=self.pool.v, table=table,
                tokens=np.pad(tokens, ((0, pad), (0, 0))), seg=np.pad(seg, ((0, pad), (0, 0))),
                lengths=np.pad(lengths, (0, pad)))
            for s, written in zip(slots, seg.sum(1), strict=True):
                self.slots[s].length += int(written)

    def _decode(self, params, lora, slots) -> list[Generation]:
        steps, recs = self.decode_steps, [self.slots[s] for s in slots]
        budget = np.array([min(r.max_new - r.made(),
                               # a sampled token sits at position length + 1 + (steps so far);
                               # the last one that fits is at max_len - 1
                               self.max_len - 1 - r.length) for r in recs], np.int32)
        for s, b in zip(slots, budget, strict=True):  # the call writes [length, length + steps)
            self._ensure(s, self.slots[s].length + min(steps, int(b)))
        lengths = self._lengths(slots)
        window = self._len_bucket(int(lengths.max()) + min(steps, int(budget.max())))
        table = self._table(slots, window)
        pad = table.shape[0] - len(slots)
        keys = np.stack([r.key for r in recs])
        out = self._decode_call(
            params, lora, k=self.pool.k, v=self.pool.v, table=table,
            tokens=np.pad(np.array([r.next_input for r in recs], np.int32), (0, pad)),
            lengths=np.pad(lengths, (0, pad)),
            keys=np.pad(keys, ((0, pad),) + ((0, 0),) * (keys.ndim - 1)),
            temperature=np.pad(np.array([r.temperature for r in recs], np.float32), (0, pad),
                               constant_values=1.0),
            budget=np.pad(budget, (0, pad)), stop_ids=self.stop_ids, num_steps=steps)
        self.pool.k, self.pool.v = out.k, out.v
        out_ids, out_logps, n_out = (np.asarray(out.ids_BxN), np.asarray(out.logps_BxN),
                                     np.asarray(out.n_out_B))
        finished = []
        for i, (s, rec) in enumerate(zip(slots, recs, strict=True)):
            k = int(n_out[i])
            ids = out_ids[i, :k]
            rec.out_ids.append(ids)
            rec.out_logps.append(out_logps[i, :k])
            rec.length += k  # the inputs fed: the previous last token and all new but the last
            if k:
                rec.next_input = int(ids[-1])
            if k and ids[-1] in self.stop_ids:
                reason = STOP
            elif rec.made() >= rec.max_new:
                reason = MAX_NEW
            elif rec.length + 1 >= self.max_len:
                reason = CONTEXT_FULL
            else:
                continue
            rec.status = FULL if reason == CONTEXT_FULL else WAITING
            finished.append(Generation(s, np.concatenate(rec.out_ids).astype(np.int32),
                                       np.concatenate(rec.out_logps).astype(self._logp_dtype),
                                       reason))
            rec.out_ids, rec.out_logps = [], []
        return finished

    def _prefill_call(self, params, lora, **kw):
        params, lora = self._layers(params, lora)
        return self.programs.prefill(params, lora, **kw)

    def _decode_call(self, params, lora, **kw):
        params, lora = self._layers(params, lora)
        return self.programs.decode(params, lora, top_k=self.top_k, top_p=self.top_p, **kw)


def generate(config: ModelConfig, params, prompts, *, key, lora=None, max_new_tokens: int = 1500,
             stop_ids=(), temperature: float = 1.0, mesh=None, max_len: int | None = None,
             **engine_kwargs) -> list[Generation]:
    """One reply per prompt (a list of token-id lists); prompt i's episode key is
    fold_in(key, i)."""
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
