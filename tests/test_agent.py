"""The ReAct prompt, code extraction, observation truncation and formatting."""
import pytest

from loopjax.agent import (
    NO_CODE_MESSAGE,
    TRUNCATION_MARK,
    Conversation,
    extract_code,
    format_code_turn,
    format_observation,
    react_messages,
    truncate_observation,
)
from loopjax.agent.prompt import EXAMPLE_STEPS
from loopjax.models.tokenizer import train_sentencepiece

TASK = dict(name="Joe Doe", email="joe@example.com", phone="555-0199", date="2024-05-15")


class CharTokenizer:
    """One id per character: token counts are exact and easy to reason about."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class PairTokenizer(CharTokenizer):
    """Two characters per id (byte-pair-like), so a prefix can re-encode differently."""

    def encode(self, text):
        return [ord(text[i]) * 65536 + (ord(text[i + 1]) if i + 1 < len(text) else 0)
                for i in range(0, len(text), 2)]

    def decode(self, ids):
        return "".join(chr(i // 65536) + (chr(i % 65536) if i % 65536 else "") for i in ids)


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    texts = [m for _, m in react_messages("Send $5 to Bob.", **TASK)] * 3
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("spm")), vocab_size=600)


# ----------------------------------------------------------------------------- extract_code
@pytest.mark.parametrize("text,code", [
    ("Let me look.\n```python\nprint(1)\n```\nDone.", "print(1)"),
    ("```\nx = 1\n```", "x = 1"),                                   # bare fence counts
    ("```py\nx = 1\n```", "x = 1"),
    ("```Python3\nx = 1\n```", "x = 1"),
    ("a\n```python\nx = 1\n```\nb\n```python\nprint(x)\n```\n", "x = 1\nprint(x)"),  # in order
    # unclosed
    ("```python\nfor i in range(3):\n    print(i)\n", "for i in range(3):\n    print(i)"),
    ("```python\nx = 1\n```\n```python\ny = 2", "x = 1\ny = 2"),    # closed then unclosed
    ("```python\nprint(1)```", "print(1)"),                          # fence at the end of a line
    ("```json\n{\"a\": 1}\n```\n```python\nx = 1\n```", "x = 1"),   # other languages skipped
    ("Use `x` or ```inline``` here.\n```python\nx = 2\n```", "x = 2"),
    ("    ```python\n    if x:\n        y = 1\n    ```", "if x:\n    y = 1"),  # dedented
    ("```python\n\n\nx = 1\n\n```", "x = 1"),
    ("No code here, just words.", ""),                               # no fences: no code
    ("```python\n```", ""),                                          # empty block
    ("```python", ""),                                               # fence, nothing after it
    ("", ""),
])
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_extract_code_keeps_indentation_quotes_and_brackets():
    code = "def f(d):\n\treturn {'k': [d[\"x\"], (1, 2)]}\n\nprint(f({'x': '`'}))"
    assert extract_code(format_code_turn(code, "thinking")) == code
    assert "```python" in NO_CODE_MESSAGE  # tells the agent what to write


# ----------------------------------------------------------------------------- truncation
def test_truncation_within_and_at_the_limit():
    tok = CharTokenizer()
    assert truncate_observation("abc def", tok, max_tokens=7) == "abc def"  # exactly at the limit
    assert truncate_observation("", tok, max_tokens=1) == ""


def test_truncation_cuts_at_last_newline_or_space_before_the_limit():
    tok = CharTokenizer()
    text = "line one\nline two words"
    # Limit 12 keeps "line one\nlin" -> cut back to the newline.
    assert truncate_observation(text, tok, max_tokens=12) == "line one" + TRUNCATION_MARK
    # Limit 14 keeps "line one\nline " -> the space at index 13 is the cut.
    assert truncate_observation(text, tok, max_tokens=14) == "line one\nline" + TRUNCATION_MARK
    # One id over: "line one\nline two words" minus the last char -> cut at the last space.
    out = truncate_observation(text, tok, max_tokens=len(text) - 1)
    assert out == "line one\nline two" + TRUNCATION_MARK
    # No whitespace before the limit: cut mid-word at the limit.
    assert truncate_observation("abcdefgh", tok, max_tokens=5) == "abcde" + TRUNCATION_MARK
    with pytest.raises(ValueError):
        truncate_observation("x", tok, max_tokens=0)


def test_truncated_text_fits_the_budget_with_real_tokenizers(spm_tok):
    text = "\n".join(f"{{'id': {i}, 'name': 'Contact {i}', 'note': 'é€ ok'}}" for i in range(200))
    for tok in (spm_tok, PairTokenizer()):
        for limit in (1, 7, 50, 333):
            out = truncate_observation(text, tok, max_tokens=limit)
            kept = out[: -len(TRUNCATION_MARK)]
            assert out.endswith(TRUNCATION_MARK) and text.startswith(kept)
            assert len(tok.encode(kept)) <= limit
            if limit >= 50:  # long enough to contain whitespace: cut at it
                assert text[len(kept)] in " \n"


# ----------------------------------------------------------------------------- prompt
def test_full_prompt_has_instructions_example_and_task(spm_tok):
    msgs = react_messages("Send $5 to Bob.", **TASK)
    roles = [r for r, _ in msgs]
    assert roles[0] == "system" and roles[-1] == "user"
    assert all(r in ("system", "user", "assistant") for r in roles)
    # user/assistant alternate
    assert all(a != b for a, b in zip(roles[1:], roles[2:], strict=False))
    system = msgs[0][1]
    for must in ("docs before using an API", "exactly one code block per turn",
                 "apis.supervisor.complete_task("):
        assert must in system
    last = msgs[-1][1]
    for value in ("Send $5 to Bob.", "Joe Doe", "joe@example.com", "555-0199", "2024-05-15"):
        assert value in last
    example = [t for r, t in msgs if r == "assistant"]
    assert len(example) == len(EXAMPLE_STEPS)
    assert "show_api_doc(" in extract_code(example[2])
    assert extract_code(example[-1]) == "apis.supervisor.complete_task(answer=3)"
    for r, t in msgs[2:-1]:  # the example's outputs use the environment's reply format
        if r == "user":
            assert t.startswith("Output:\n```\n") and "Reminder" in t
    conv = Conversation(spm_tok)
    for role, text in msgs:
        conv.add_message(role, text)
    assert not any(conv.is_output) and conv.num_turns == 0  # the example is context only


def test_compact_prompt_is_short():
    full = react_messages("Send $5 to Bob.", **TASK)
    compact = react_messages("Send $5 to Bob.", **TASK, compact=True)
    assert [r for r, _ in compact] == ["system", "user"]
    assert "Send $5 to Bob." in compact[1][1] and "complete_task" in compact[0][1]
    assert sum(len(t) for _, t in compact) * 10 < sum(len(t) for _, t in full)


def test_format_observation():
    obs = format_observation("[1, 2]", instruction="Count things.")
    assert (obs.startswith("Output:\n```\n[1, 2]\n```")
            and obs.index("Count things.") > obs.index("[1, 2]"))
    assert "printed nothing" in format_observation("", instruction="x")
    assert format_observation("7", compact=True) == "Output:\n7"
    assert format_observation("7", instruction="Add.", compact=True) == "Output:\n7\nTask: Add."
    long = "word " * 100
    obs = format_observation(long, tokenizer=CharTokenizer(), max_tokens=12)
    assert obs == "Output:\n```\nword word" + TRUNCATION_MARK + "\n```"
