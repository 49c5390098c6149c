"""Cutting long environment output to a token budget before it enters the context."""
from __future__ import annotations

import os

TRUNCATION_MARK = "\n[output truncated]"


def truncate_observation(text: str, tokenizer, max_tokens: int = 3000) -> str:
    """`text` unchanged if it encodes to at most `max_tokens` ids; otherwise its longest prefix
    within `max_tokens` ids, cut back to the last newline or space (the whitespace itself is
    dropped; a prefix without any is cut mid-word), followed by TRUNCATION_MARK. The kept text is
    at most `max_tokens` ids; the mark adds a few more. `tokenizer` needs encode/decode."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return text
    # The decoded prefix may end in half a character (byte-level ids); keep only what matches.
    head = os.path.commonprefix([tokenizer.decode(ids[:max_tokens]), text])
    while True:
        cut = max(head.rfind("\n"), head.rfind(" "))
        kept = head[:cut] if cut > 0 else head
        if len(tokenizer.encode(kept)) <= max_tokens or not kept:
            return kept + TRUNCATION_MARK
        head = kept[:-1]  # re-encoding merged differently and ran over: cut further back
