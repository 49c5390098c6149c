"""A slot-based KV-cache sampling engine that runs on the learner's own (sharded) params.

One preallocated cache holds S slots of `max_len` positions each (k, v: L x S x max_len x Hk x Dh,
rows sharded over the data-parallel mesh axes, kv heads over "tensor"). A slot holds one episode:
its cache persists across turns, so each turn prefills only the new tokens (the environment's
reply) and then decodes. Params and LoRA are passed to every call and never copied, so the learner
can update them between calls with no weight sync.

Driving it (the environment loop):

    engine = SamplingEngine(config, num_slots=S, max_len=M, mesh=mesh, stop_ids=(eos, eot))
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
("stop"), after its `max_new_tokens` ("max_new_tokens"), or when the slot's cache is full
("context_full"; the slot then takes no more tokens). `free` sets the slot's length to 0: every
cache position a new episode attends to is written by that episode first, so stale contents are
never read.

Shared prompts (`share_prompts`, on by default): new episodes that enter one prefill with the
same prompt (LOOP's K rollouts of a task) prefill it once; the other slots get a copy of its keys
and values (one gather/scatter over the cache), the tokens counted in `prefill_shared_tokens`
(`prefill_tokens` counts those computed). The copy holds exactly what the slot would have
computed, up to the last float bit that a prefill of a different row count can round differently.

Static shapes: each jitted call works on a bucket of rows (the busy slots, gathered out of the
cache, row count rounded up to a power of two) and a power-of-two prefix of the cache positions
(>= the longest busy slot + the steps to run), so a run compiles at most
log2(S) x log2(max_len) decode programs, log2(S) x log2(max_len) x log2(prefill_chunk) prefill
programs and log2(S) x log2(max_len) copy programs, whatever the prompt lengths (compiled
programs are shared by engines of the same config; `loopjax.sampling.engine.TRACES` counts the
traces). The cache is donated.

Randomness: every episode has its own key (given to `add` when the slot is free). The token at
conversation position p (0-based, counting every prompt / reply / generated token of the episode)
is drawn with `fold_in(episode_key, p)`. Draws therefore do not depend on which other slots are
busy, on how turns are grouped into steps, or on the slot number. (The logits themselves can
differ in the last float bits between batch shapes, so a near-tie can still flip.)

Log-probs: `logps[i]` = log_softmax(logits / T)[ids[i]] for the row's temperature T, the quantity
`token_logprobs(config, params, conversation, lora=lora, temperature=T)` recomputes (see
loopjax.sampling.sample for greedy and top-k / top-p). Measured difference to that full-forward
recompute over a 4-turn conversation with LoRA active (tests/test_sampling.py, CPU): 4.8e-7 with
fp32 params; 4.8e-7 with bf16 params and bf16 cache too (both paths round the same bf16 k/v and
XLA:CPU accumulates bf16 dots in fp32; on GPU/TPU kernels expect up to ~1e-2, which the test allows).
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
from loopjax.models.transformer import KVCache, acc_dtype, forward, hidden_states
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


class SamplingEngine:
    """S slots of KV cache; see the module docstring for how to drive it."""

    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, *, mesh=None,
                 stop_ids=(), cache_dtype=None, prefill_chunk: int = 512, decode_steps: int = 32,
                 min_len_bucket: int = 64, top_k: int = 0, top_p: float = 1.0,
                 share_prompts: bool = True):
        if num_slots <= 0 or max_len <= 1:
            raise ValueError(f"num_slots ({num_slots}) must be >= 1 and max_len ({max_len}) >= 2")
        if prefill_chunk <= 0 or decode_steps <= 0:
            raise ValueError(f"prefill_chunk ({prefill_chunk}) and decode_steps ({decode_steps}) "
                             "must be positive")
        if not 0.0 < top_p <= 1.0 or top_k < 0:
            raise ValueError(f"top_p must be in (0, 1] and top_k >= 0 (0 = off); got {top_p}, {top_k}")
        self.config, self.num_slots, self.max_len, self.mesh = config, num_slots, max_len, mesh
        self.prefill_chunk, self.decode_steps = _pow2(prefill_chunk), decode_steps
        self.min_len_bucket, self.top_k, self.top_p = min_len_bucket, top_k, top_p
        self.share_prompts = share_prompts
        # Prompt tokens put in the cache by a prefill, and those copied from another slot instead.
        self.prefill_tokens, self.prefill_shared_tokens = 0, 0
        self.stop_ids = np.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], np.int32)
        self.min_rows = 1
        # fp32 log-probs, float64 for a float64 model (numerics checks under JAX's x64 mode).
        self._logp_dtype = np.float64 if config.dtype == "float64" else np.float32
        shape = (config.num_layers, num_slots, max_len, config.num_kv_heads, config.head_dim)
        dtype = jnp.dtype(cache_dtype or config.jnp_dtype)
        if mesh is None:
            self.k, self.v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        else:
            dp = mesh.shape["data"] * mesh.shape["fsdp"]
            self.min_rows = min(dp, _pow2(num_slots))  # row buckets split evenly over dp devices
            sharding = NamedSharding(mesh, _fit(P(None, ("data", "fsdp"), None, "tensor", None),
                                                shape, mesh))
            zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
            self.k, self.v = zeros(), zeros()
        # Host-side state per slot (authoritative; the device only holds k and v).
        self.lengths = np.zeros(num_slots, np.int64)  # cache positions holding this episode's tokens
        self.status = [_FREE] * num_slots
        self.queued: list[list[int]] = [[] for _ in range(num_slots)]  # tokens waiting for prefill
        self.next_input = np.zeros(num_slots, np.int32)  # last token, not yet in the cache
        self.keys = None  # per-slot key data, allocated on the first add (its shape is the impl's)
        self.temperature = np.ones(num_slots, np.float32)
        self.max_new = np.zeros(num_slots, np.int64)
        self.out_ids: list[list[np.ndarray]] = [[] for _ in range(num_slots)]
        self.out_logps: list[list[np.ndarray]] = [[] for _ in range(num_slots)]

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
            self.lengths[slot] = 0
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
        self.lengths[slot] = 0
        self.queued[slot], self.out_ids[slot], self.out_logps[slot] = [], [], []

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

    def _rows(self, slots):
        """Slot indices padded to a power-of-two bucket with out-of-range rows (dropped on write)."""
        n = min(_pow2(len(slots), self.min_rows), max(self.num_slots, self.min_rows))
        rows = np.full(n, self.num_slots, np.int32)
        rows[:len(slots)] = slots
        return rows

    def _len_bucket(self, needed: int) -> int:
        return min(_pow2(needed, self.min_len_bucket), self.max_len)

    def _shared_prompts(self, todo) -> dict[int, int]:
        """{slot: the slot whose cache it copies}: new episodes whose prompt (all but its last
        token) another new episode of this prefill has too, e.g. the K rollouts of a task."""
        first, copies = {}, {}
        for s, tokens in todo.items():
            if self.share_prompts and self.lengths[s] == 0 and tokens:
                src = first.setdefault(tuple(tokens), s)
                if src != s:
                    copies[s] = src
        return copies

    def _prefill(self, params, lora, slots):
        # Every queued token but the last goes into the cache here; the last is the first decode
        # step's input, so the first sampled token comes from the same decode program as the rest.
        todo = {s: self.queued[s][:-1] for s in slots}
        for s in slots:
            self.next_input[s] = self.queued[s][-1]
            self.queued[s] = []
            self.status[s] = _DECODING
        copies = self._shared_prompts(todo)
        slots = [s for s in slots if s not in copies]
        todo = {s: todo[s] for s in slots}
        self.prefill_tokens += sum(len(t) for t in todo.values())
        rows = self._rows(slots)
        C = self.prefill_chunk
        while any(todo.values()):
            longest = max(len(t) for t in todo.values())
            T = min(_pow2(longest, 16), C)
            tokens = np.zeros((len(rows), T), np.int32)
            seg = np.zeros((len(rows), T), np.int32)
            lengths = np.zeros(len(rows), np.int32)
            for i, s in enumerate(slots):
                chunk, todo[s] = todo[s][:T], todo[s][T:]
                tokens[i, :len(chunk)], seg[i, :len(chunk)] = chunk, 1
                lengths[i] = self.lengths[s]
            len_bucket = self._len_bucket(int((lengths + seg.sum(1)).max()))
            self.k, self.v = self._prefill_call(params, lora, k=self.k, v=self.v, rows=rows,
                                              tokens=tokens, seg=seg, lengths=lengths,
                                              len_bucket=len_bucket)
            for i, s in enumerate(slots):
                self.lengths[s] += int(seg[i].sum())
        if copies:  # the prompt's keys and values, copied from the slot that computed them
            dst = list(copies)
            src = [copies[s] for s in dst]
            self.k, self.v = _copy_program(
                k=self.k, v=self.v, src=self._rows(src), dst=self._rows(dst),
                len_bucket=self._len_bucket(int(max(self.lengths[s] for s in src))))
            for s, c in zip(dst, src):
                self.lengths[s] = self.lengths[c]
                self.prefill_shared_tokens += int(self.lengths[c])

    def _decode(self, params, lora, slots) -> list[Generation]:
        rows = self._rows(slots)
        n = len(rows)
        lengths = np.zeros(n, np.int32)
        budget = np.zeros(n, np.int32)
        keys = np.zeros((n,) + self.keys.shape[1:], self.keys.dtype)
        temperature = np.ones(n, np.float32)
        tokens = np.zeros(n, np.int32)
        for i, s in enumerate(slots):
            lengths[i] = self.lengths[s]
            made = sum(len(x) for x in self.out_ids[s])
            # A sampled token occupies conversation position lengths + 1 + (steps so far); the
            # last one that fits is at max_len - 1.
            budget[i] = min(self.max_new[s] - made, self.max_len - 1 - self.lengths[s])
            keys[i], temperature[i], tokens[i] = self.keys[s], self.temperature[s], self.next_input[s]
        steps = self.decode_steps
        len_bucket = self._len_bucket(int(lengths[:len(slots)].max()) + min(steps, int(budget.max())))
        self.k, self.v, out_ids, out_logps, n_out = self._decode_call(
            params, lora, k=self.k, v=self.v, rows=rows, tokens=tokens, lengths=lengths,
            keys=keys, temperature=temperature, budget=budget, stop_ids=self.stop_ids,
            len_bucket=len_bucket, num_steps=steps)
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
        return _prefill_program(params, lora, config=self.config, **kw)

    def _decode_call(self, params, lora, **kw):
        return _decode_program(params, lora, config=self.config, top_k=self.top_k,
                               top_p=self.top_p, **kw)


# ----------------------------------------------------------------------------- jitted programs
# Module-level, keyed on the (hashable) config, so engines of the same model share compiled code.

TRACES = collections.Counter()  # how many times each program was traced (= compiled)


def _gather(x, rows, len_bucket):
    return jnp.take(x[:, :, :len_bucket], rows, axis=1, mode="fill", fill_value=0)


def _scatter(x, rows, sub):
    return x.at[:, rows, :sub.shape[2]].set(sub, mode="drop")


@functools.partial(jax.jit, static_argnames=("config", "len_bucket"), donate_argnames=("k", "v"))
def _prefill_program(params, lora, *, config, k, v, rows, tokens, seg, lengths, len_bucket):
    TRACES["prefill"] += 1  # runs once per trace
    cache = KVCache(_gather(k, rows, len_bucket), _gather(v, rows, len_bucket), lengths)
    # hidden_states, not forward: the prefill needs no logits (the unembedding is skipped).
    _, cache = hidden_states(config, params, tokens, segment_ids_BxT=seg, lora=lora, cache=cache)
    return _scatter(k, rows, cache.k_LxBxSxHkxDh), _scatter(v, rows, cache.v_LxBxSxHkxDh)


@functools.partial(jax.jit, static_argnames=("len_bucket",), donate_argnames=("k", "v"))
def _copy_program(*, k, v, src, dst, len_bucket):
    """Cache rows dst[i] := rows src[i] over the first len_bucket positions (padding rows, out of
    range, read zeros and write nothing)."""
    TRACES["copy"] += 1
    return (_scatter(k, dst, _gather(k, src, len_bucket)),
            _scatter(v, dst, _gather(v, src, len_bucket)))


@functools.partial(jax.jit, static_argnames=("config", "top_k", "top_p", "len_bucket", "num_steps"),
                   donate_argnames=("k", "v"))
def _decode_program(params, lora, *, config, top_k, top_p, k, v, rows, tokens, lengths, keys,
                    temperature, budget, stop_ids, len_bucket, num_steps):
    TRACES["decode"] += 1
    B = rows.shape[0]
    episode_keys = jax.random.wrap_key_data(keys)
    state = dict(k=_gather(k, rows, len_bucket), v=_gather(v, rows, len_bucket),
                 lengths=lengths, tokens=tokens, active=budget > 0, step=jnp.int32(0),
                 n_out=jnp.zeros(B, jnp.int32), ids=jnp.zeros((B, num_steps), jnp.int32),
                 logps=jnp.zeros((B, num_steps), acc_dtype(config.dtype)))

    def cond(st):
        return (st["step"] < num_steps) & jnp.any(st["active"])

    def body(st):
        active = st["active"]
        cache = KVCache(st["k"], st["v"], st["lengths"])
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
    return (_scatter(k, rows, st["k"]), _scatter(v, rows, st["v"]), st["ids"], st["logps"],
            st["n_out"])


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
