"""The sampler's jitted programs: prefill into the page pool, and a fused on-device decode loop.

One `Programs` per (hashable) config, so engines of the same model share compiled code. The pool
(k, v) is donated. Each call works on a bucket of rows (the busy slots' page tables, row count
rounded up to a power of two) and a power-of-two window of cache positions, gathered out of the
pool and written back page by page (pages a call does not write are not written back). A run
therefore compiles at most log2(S) x log2(max_len) x log2(pool growth) decode programs and
log2(prefill_chunk) times that prefill programs, whatever the prompt lengths; `Programs.traces`
counts them.

Randomness: the token at conversation position p of an episode (0-based, counting every prompt,
reply and generated token) is drawn with `fold_in(episode_key, p)`, so draws do not depend on
which other slots are busy, on how turns are grouped into calls, or on the slot number. (The
logits themselves can differ in the last float bits between batch shapes, so a near-tie can still
flip.)

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
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from loopjax.models.transformer import KVCache, acc_dtype, forward, hidden_states, sampler_layout
from loopjax.sampling.sample import sample_tokens

_layout_program = jax.jit(sampler_layout)


class Layers:
    """The params the programs run on: as given, or (`unroll`) in the sampler's layout.

    On CPU the prefill and decode programs run on the params in the sampler's layout
    (`sampler_layout`): split into per-layer arrays, their layers unrolled (a layer scan would
    have XLA:CPU copy every layer's weights out of the stack at every decoded token), and each
    fp32 kernel stored transposed, F x D (XLA:CPU multiplies a decode step's few rows by it
    1.1-1.9x faster, `matmul_t`). That copy is made when params come that have not been laid out
    yet and kept while they are the same arrays: one more copy of the model in memory. Elsewhere,
    or without `unroll`, the layers are a scan over the params as given: no copy, and a compile
    time that does not grow with depth.
    """

    def __init__(self, unroll: bool):
        self.unroll = unroll
        self._split = None  # (the params' and LoRA's leaves, their per-layer split) if unrolled

    def __call__(self, params, lora):
        if not self.unroll:
            return params, lora
        leaves = jax.tree.leaves((params, lora))
        if (self._split is None or len(self._split[0]) != len(leaves)
                or any(a is not b for a, b in zip(self._split[0], leaves, strict=True))):
            self._split = None  # the old split's memory goes first
            self._split = (leaves, *_layout_program(params, lora))
        return self._split[1], self._split[2]


class DecodeCarry(NamedTuple):
    """What the decode loop carries from one step to the next (B rows, N = num_steps)."""
    k: jax.Array  # the page pool, as the cache hands it back
    v: jax.Array
    lengths_B: jax.Array  # cache positions holding each row's tokens
    tokens_B: jax.Array  # each row's next input (its last token, not yet in the cache)
    active_B: jax.Array  # rows still drawing
    step: jax.Array  # steps run so far
    n_out_B: jax.Array  # tokens drawn per row
    ids_BxN: jax.Array  # the drawn tokens, in order
    logps_BxN: jax.Array  # their log-probs


class Decoded(NamedTuple):
    """What a decode call returns: the pool, and per row its drawn tokens and their count."""
    k: jax.Array
    v: jax.Array
    ids_BxN: jax.Array
    logps_BxN: jax.Array
    n_out_B: jax.Array


def _decode(config, params, lora, *, top_k, top_p, k, v, table, tokens, lengths, keys,
            temperature, budget, stop_ids, num_steps) -> Decoded:
    """`num_steps` decode steps (fewer once every row stopped); a row stops at a stop id or after
    its `budget` tokens. params stacked or split into layers (`sampler_layout`, then the layers
    run unrolled)."""
    B = table.shape[0]
    episode_keys = jax.random.wrap_key_data(keys)
    init = DecodeCarry(k=k, v=v, lengths_B=lengths, tokens_B=tokens, active_B=budget > 0,
                       step=jnp.int32(0), n_out_B=jnp.zeros(B, jnp.int32),
                       ids_BxN=jnp.zeros((B, num_steps), jnp.int32),
                       logps_BxN=jnp.zeros((B, num_steps), acc_dtype(config.dtype)))

    def cond(st: DecodeCarry):
        return (st.step < num_steps) & jnp.any(st.active_B)

    def body(st: DecodeCarry) -> DecodeCarry:
        active_B = st.active_B
        cache = KVCache(st.k, st.v, st.lengths_B, table)
        logits, cache = forward(config, params, st.tokens_B[:, None], lora=lora,
                                segment_ids_BxT=active_B[:, None].astype(jnp.int32), cache=cache)
        # The sampled token's conversation position is the input's position + 1.
        step_keys = jax.vmap(jax.random.fold_in)(episode_keys, st.lengths_B + 1)
        tok_B, logp_B = sample_tokens(logits[:, 0], step_keys, temperature, top_k=top_k,
                                      top_p=top_p)
        n_out_B = st.n_out_B + active_B
        stopped_B = jnp.any(tok_B[:, None] == stop_ids[None, :], axis=1) | (n_out_B >= budget)
        write_BxN = (jnp.arange(num_steps)[None, :] == st.step) & active_B[:, None]
        return DecodeCarry(k=cache.k_LxBxSxHkxDh, v=cache.v_LxBxSxHkxDh, lengths_B=cache.lengths_B,
                           tokens_B=jnp.where(active_B, tok_B, st.tokens_B),
                           active_B=active_B & ~stopped_B, step=st.step + 1, n_out_B=n_out_B,
                           ids_BxN=jnp.where(write_BxN, tok_B[:, None], st.ids_BxN),
                           logps_BxN=jnp.where(write_BxN, logp_B[:, None], st.logps_BxN))

    st = jax.lax.while_loop(cond, body, init)
    return Decoded(st.k, st.v, st.ids_BxN, st.logps_BxN, st.n_out_B)


def _prefill(config, params, lora, *, k, v, table, tokens, seg, lengths):
    """Writes the rows' tokens (segment 1; 0 = padding) into the pool after their `lengths`."""
    # The layer scan reads each layer's pages of the rows and writes the new tokens into the pool.
    cache = KVCache(k, v, lengths, table)
    # hidden_states, not forward: the prefill needs no logits (the unembedding is skipped).
    _, cache = hidden_states(config, params, tokens, segment_ids_BxT=seg, lora=lora, cache=cache)
    return cache.k_LxBxSxHkxDh, cache.v_LxBxSxHkxDh


class Programs:
    """One model config's jitted prefill and decode, and how many times each was traced (one
    compiled program per trace). Engines of one config share one (`programs_for`), and so their
    compiled code."""

    def __init__(self, config):
        self.config = config
        self.traces = collections.Counter()  # program name -> traces so far

        def prefill(params, lora, *, k, v, table, tokens, seg, lengths):
            self.traces["prefill"] += 1  # runs once per trace
            return _prefill(config, params, lora, k=k, v=v, table=table, tokens=tokens, seg=seg,
                            lengths=lengths)

        def decode(params, lora, *, top_k, top_p, k, v, table, tokens, lengths, keys, temperature,
                   budget, stop_ids, num_steps):
            self.traces["decode"] += 1
            return _decode(config, params, lora, top_k=top_k, top_p=top_p, k=k, v=v, table=table,
                           tokens=tokens, lengths=lengths, keys=keys, temperature=temperature,
                           budget=budget, stop_ids=stop_ids, num_steps=num_steps)

        self.prefill = jax.jit(prefill, donate_argnames=("k", "v"))
        self.decode = jax.jit(decode, static_argnames=("top_k", "top_p", "num_steps"),
                              donate_argnames=("k", "v"))


_PROGRAMS: dict = {}  # config -> its Programs: the compiled code lives as long as the process


def programs_for(config) -> Programs:
    if config not in _PROGRAMS:
        _PROGRAMS[config] = Programs(config)
    return _PROGRAMS[config]


class _Traces(Mapping):
    """Program name -> traces over every config's Programs (read-only; nothing counts here)."""

    def __getitem__(self, name: str) -> int:
        return sum(p.traces[name] for p in _PROGRAMS.values())

    def __iter__(self):
        return iter(("prefill", "decode"))

    def __len__(self) -> int:
        return 2


TRACES = _Traces()
