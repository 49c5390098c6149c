"""What the engine tracks per slot (one episode each) on the host, and what a finished turn is.

A slot goes FREE -> QUEUED (`add`: tokens wait for a prefill) -> DECODING (prefilled; drawing)
-> WAITING (the turn finished; `add` queues the reply) or FULL (the context is full: only `free`
is left) -> ... and back to FREE with `free`. A turn ends for one of STOP (a stop id), MAX_NEW
(its max_new_tokens) or CONTEXT_FULL.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from loopjax.sampling.prefix_tree import ROOT

STOP, MAX_NEW, CONTEXT_FULL = "stop", "max_new_tokens", "context_full"
FREE, QUEUED, DECODING, WAITING, FULL = "free", "queued", "decoding", "waiting", "full"


@dataclasses.dataclass
class Generation:
    """One finished turn of one slot: sampled ids (stop id included) and their log-probs."""
    slot: int
    ids: np.ndarray  # int32, the generated tokens in order
    logps: np.ndarray  # fp32, log-prob of each generated token under the sampled distribution
    stop_reason: str  # "stop" | "max_new_tokens" | "context_full"


@dataclasses.dataclass
class Slot:
    """One slot's episode (its pages are the slot's row of the PagePool's tables)."""
    status: str = FREE
    length: int = 0  # cache positions holding this episode's tokens
    queued: list[int] = dataclasses.field(default_factory=list)  # tokens waiting for prefill
    next_input: int = 0  # the last token, not yet in the cache
    key: np.ndarray | None = None  # the episode's PRNG key data
    temperature: float = 1.0  # the turn's; 0 = greedy
    max_new: int = 0  # the turn's max_new_tokens
    out_ids: list[np.ndarray] = dataclasses.field(default_factory=list)  # the turn's draws so far
    out_logps: list[np.ndarray] = dataclasses.field(default_factory=list)
    prompt: list[int] | None = None  # a starting episode's prompt, until the prefix tree has it
    node: int = ROOT  # the page its prompt's matched prefix ends in

    def made(self) -> int:
        """Tokens drawn in the turn so far."""
        return sum(len(x) for x in self.out_ids)
