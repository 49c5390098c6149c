"""The prefix cache's index: full prompt pages by their tokens and the page before them.

Every full page of a new episode's prompt is entered under (the page before it, or ROOT for the
first; its page_size tokens). A new episode whose prompt starts with pages already there maps
them into its table (shared, reference-counted, never written again) and prefills only the rest.
Keying on the page before makes an entry a whole prefix: a page with the same tokens at another
position, or after other tokens, is not matched. So LOOP's K rollouts of a task compute their
prompt once, and the system prompt and worked example common to every episode are computed once
per collection.

Cached keys and values belong to the params that computed them: the engine clears the tree
(and unpins its pages in the pool) when params change. A mapped page holds what the episode
would have computed, up to the last float bit that a prefill of another batch shape can round
differently.
"""

from __future__ import annotations

ROOT = -1  # the parent of a prompt's first page


class PrefixTree:
    """(parent page, the page's tokens) -> the page holding them; the pages themselves live in
    the PagePool, which the caller pins for as long as the tree holds them."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._pages: dict[tuple[int, tuple[int, ...]], int] = {}

    def __len__(self) -> int:
        return len(self._pages)

    def key(self, parent: int, tokens) -> tuple[int, tuple[int, ...]] | None:
        """The entry a page after `parent` starting `tokens` would have; None if `tokens` holds
        less than a page."""
        if len(tokens) < self.page_size:
            return None
        return int(parent), tuple(int(t) for t in tokens[:self.page_size])

    def child(self, parent: int, tokens) -> int | None:
        """The cached page that continues `parent` with the first page of `tokens`, if any."""
        key = self.key(parent, tokens)
        return None if key is None else self._pages.get(key)

    def insert(self, pages, prompt) -> list[int]:
        """Enters the full pages of `prompt`, page j of it held in pages[j]; returns the pages
        newly entered (the caller pins them). A page whose entry exists stays the tree's old one."""
        ps, new = self.page_size, []
        for j in range(len(prompt) // ps):
            key = self.key(int(pages[j - 1]) if j else ROOT, prompt[j * ps:(j + 1) * ps])
            if key not in self._pages:
                self._pages[key] = int(pages[j])
                new.append(int(pages[j]))
        return new

    def clear(self):
        self._pages.clear()
