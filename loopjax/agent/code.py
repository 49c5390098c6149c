"""Extracting the code an assistant turn asks to run.

The agent writes reasoning and fenced python blocks; every python block of the turn runs, in order,
as one program. Rules (lenient, because a policy early in training writes sloppy markdown):
- A block opens with ``` followed by an info string up to the end of the line. It is python when
  the info string is empty or starts with python / py / python3 / ipython (any case); other
  languages (```json, ```text, ```bash) are skipped.
- A block closes at the next ``` anywhere (also at the end of a code line); a final block that is
  never closed runs to the end of the turn (generation may stop at the length limit, or the model
  may end its turn right after the code).
- An inline ```x``` on one line is not a block.
- Each block is dedented and stripped of blank lines around it; blocks are joined by a newline.
- A turn with no python block yields "" -- the collector then runs nothing and answers with
  `NO_CODE_MESSAGE`, which tells the agent how to act (the turn still counts against the budget).
"""
from __future__ import annotations

import textwrap

FENCE = "```"
PYTHON_TAGS = frozenset({"", "python", "py", "python3", "ipython"})
NO_CODE_MESSAGE = ("No code was run: your reply had no ```python code block. Reply with your "
                   "reasoning and then exactly one block:\n```python\n# your code\n```")


def code_blocks(text: str) -> list[str]:
    """The python blocks of a turn, in order (see the module docstring for the rules)."""
    blocks: list[str] = []
    pos = 0
    while (start := text.find(FENCE, pos)) >= 0:
        line_end = text.find("\n", start + len(FENCE))
        if line_end < 0:  # "```python" as the very last line: an empty block
            break
        info = text[start + len(FENCE):line_end]
        if FENCE in info:  # inline ```x``` on one line: not a block
            pos = start + len(FENCE) + info.index(FENCE) + len(FENCE)
            continue
        close = text.find(FENCE, line_end + 1)
        body = text[line_end + 1:] if close < 0 else text[line_end + 1:close]
        pos = len(text) if close < 0 else close + len(FENCE)
        words = info.split()
        if (words[0].lower() if words else "") in PYTHON_TAGS:
            code = textwrap.dedent(body).strip("\n").rstrip()
            if code.strip():
                blocks.append(code)
    return blocks


def extract_code(text: str) -> str:
    """All python blocks of a turn joined by newlines in order; "" when there are none."""
    return "\n".join(code_blocks(text))
