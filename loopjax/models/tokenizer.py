"""Tokenizers for loopjax: one small interface over a local transformers tokenizer or a
SentencePiece model.

The rest of loopjax needs only: `encode(text)` (content, no special tokens added), `decode(ids)`,
`vocab_size`, `eos_ids`, `pad_id`, and the chat pieces -- the ids before and after a message's
content (`turn_prefix_ids(role)`, `turn_suffix_ids(role)`), the ids that open a conversation
(`begin_ids()`) and the assistant generation prompt (`generation_prompt_ids()`). A conversation is
then built by concatenating ids (see `loopjax.agent.conversation.Conversation`), never by
re-rendering text, so tokens the sampler generated are never re-tokenized.

`encode` treats its text literally: a special-token string inside content (an observation that
prints "<|im_end|>") is encoded as plain characters, so environment output cannot end a turn.

Loading never downloads: `load_tokenizer(path)` reads a local folder, either a transformers
tokenizer (tokenizer.json / tokenizer_config.json) or one written by `train_sentencepiece`, or a
.gguf file (the tokenizer and chat template stored in its metadata).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant")
# Special tokens that end a turn or a document in the model families loopjax loads.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>",
              "<end_of_turn>", "</s>")
SPM_MODEL_FILE = "sentencepiece.model"
SPM_META_FILE = "loopjax_tokenizer.json"
SPM_SPACE = "\u2581"  # SentencePiece's space symbol; literal occurrences are encoded as raw bytes


@dataclasses.dataclass(frozen=True)
class ChatPieces:
    """Chat-format text pieces: a message of role r renders as prefix[r] + content + suffix[r]."""
    begin: str                      # text before the first message (e.g. Llama-3's BOS)
    prefix: Mapping[str, str]
    suffix: Mapping[str, str]
    generation_prompt: str          # appended after the last message to let the assistant speak
    any_role: bool = False          # ChatML: roles outside prefix/suffix render generically


def chatml_pieces() -> ChatPieces:
    """ChatML: "<|im_start|>{role}\\n{content}<|im_end|>\\n" for every role."""
    return ChatPieces(begin="", prefix={r: f"{IM_START}{r}\n" for r in CHAT_ROLES},
                      suffix={r: f"{IM_END}\n" for r in CHAT_ROLES},
                      generation_prompt=f"{IM_START}assistant\n", any_role=True)


class Tokenizer:
    """The interface loopjax uses. Subclasses implement `encode`, `decode`, `_encode_markup`."""

    vocab_size: int
    eos_ids: frozenset[int]   # ids that end an assistant turn (the sampler stops on any of them)
    pad_id: int
    pieces: ChatPieces

    def encode(self, text: str) -> list[int]:
        """Ids of `text` taken literally: no BOS/EOS added, special-token strings not parsed."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included, no clean-up of spaces."""
        raise NotImplementedError

    def _encode_markup(self, text: str) -> list[int]:
        """Ids of chat-format text, in which special-token strings ARE the special tokens."""
        raise NotImplementedError

    def _finish_init(self) -> None:
        """Tokenize the chat pieces once; checks that the assistant turn ends with an eos id."""
        p = self.pieces
        self._begin = self._encode_markup(p.begin) if p.begin else []
        self._prefix = {r: self._encode_markup(t) for r, t in p.prefix.items()}
        self._suffix = {r: self._encode_markup(t) for r, t in p.suffix.items()}
        self._gen = self._encode_markup(p.generation_prompt)
        end = self._suffix.get("assistant", [])
        if not end:
            raise ValueError(f"{self!r}: the chat format has no assistant end-of-turn token")
        self.eos_ids = frozenset(self.eos_ids) | {end[0]}

    def _role(self, role: str, table: dict[str, list[int]]) -> list[int]:
        if role not in table:
            if not self.pieces.any_role:
                raise KeyError(f"role {role!r} is not in this chat template; use one of "
                               f"{sorted(table)}")
            generic = chatml_pieces()  # only ChatML renders arbitrary roles
            text = f"{IM_START}{role}\n" if table is self._prefix else generic.suffix["user"]
            table[role] = self._encode_markup(text)
        return list(table[role])

    def begin_ids(self) -> list[int]:
        """Ids that open a conversation, before the first message (Llama-3: [BOS]; ChatML: [])."""
        return list(self._begin)

    def turn_prefix_ids(self, role: str) -> list[int]:
        """Ids before a message's content (ChatML: "<|im_start|>{role}\\n")."""
        return self._role(role, self._prefix)

    def turn_suffix_ids(self, role: str) -> list[int]:
        """Ids after a message's content (ChatML: "<|im_end|>\\n"); for the assistant the first
        of them is the end-of-turn id the model generates."""
        return self._role(role, self._suffix)

    def generation_prompt_ids(self) -> list[int]:
        """Ids appended after the last message so that the assistant speaks next."""
        return list(self._gen)

    @property
    def end_of_turn_id(self) -> int:
        """The id that closes an assistant message in this chat format (ChatML: <|im_end|>)."""
        return self._suffix["assistant"][0]

    def message_ids(self, role: str, text: str) -> list[int]:
        """prefix + encode(text) + suffix: one whole message."""
        return self.turn_prefix_ids(role) + self.encode(text) + self.turn_suffix_ids(role)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, "
                f"eos_ids={sorted(self.eos_ids)})")


def _split_specials(text: str, specials: Sequence[str]) -> list[tuple[str, bool]]:
    """Split `text` into (segment, is_special_string) around any of `specials`."""
    if not specials:
        return [(text, False)]
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [(seg, i % 2 == 1) for i, seg in enumerate(re.split(pattern, text)) if seg]


# ----------------------------------------------------------------------------- transformers
class HFTokenizer(Tokenizer):
    """A transformers tokenizer (AutoTokenizer, local files only) with pieces from its chat
    template."""

    def __init__(self, hf_tokenizer, pieces: ChatPieces, extra_eos_ids: Iterable[int] = ()):
        self.hf = hf_tokenizer
        self.pieces = pieces
        self.vocab_size = len(hf_tokenizer)
        vocab = hf_tokenizer.get_vocab()
        eos = {vocab[t] for t in END_TOKENS if t in vocab} | set(extra_eos_ids)
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self._finish_init()
        pad = hf_tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.end_of_turn_id)
        probe = "def f(x):\n    return {'a': [x, \"b\"]}\n\n\tz = 1  # ok\n"
        if self.decode(self.encode(probe)) != probe:
            warnings.warn(f"{hf_tokenizer.name_or_path}: decode(encode(text)) != text; loopjax "
                          "expects tokenizers that round-trip text exactly (byte-level BPE)",
                          stacklevel=1)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def _encode_markup(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False,
                              clean_up_tokenization_spaces=False)


def pieces_from_chat_template(render: Callable[[list[dict], bool], str],
                              bos_token: str | None = None) -> ChatPieces:
    """Derive per-role prefix/suffix text from a chat template by rendering sentinel messages.

    `render(messages, add_generation_prompt) -> str`. The probe conversation is
    system, user, assistant, user, assistant, user with a distinct sentinel as each content, so
    every role is seen in the MIDDLE of a conversation, where templates render plainly: a default
    system message (Qwen2.5) is only injected when no system message comes first, and Qwen3 adds
    "<think>" tags only to an assistant message after the last user message. Between two sentinels
    lies suffix(role_i) + prefix(role_i+1); the user suffix is what follows the last sentinel, the
    assistant suffix what follows the last sentinel of the same conversation cut after an assistant
    message; the rest follows by subtraction, and each role's pieces are checked to be the same at
    both of its positions.
    """
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    marks = [f"@@loopjax-sentinel-{i}@@" for i in range(len(roles))]
    msgs = [{"role": r, "content": m} for r, m in zip(roles, marks, strict=True)]
    full = render(msgs, False)
    with_gen = render(msgs, True)
    cut = render(msgs[:5], False)

    def where(text: str, mark: str) -> int:
        if text.count(mark) != 1:
            raise ValueError(f"the chat template does not render message content exactly once "
                             f"({mark!r} found {text.count(mark)} times in {text!r})")
        return text.index(mark)

    starts = [where(full, m) for m in marks]
    ends = [s + len(m) for s, m in zip(starts, marks, strict=True)]
    gaps = [full[ends[i]:starts[i + 1]] for i in range(len(marks) - 1)]
    suffix_user = full[ends[-1]:]
    suffix_asst = cut[where(cut, marks[4]) + len(marks[4]):]

    def strip(text: str, head: str = "", tail: str = "") -> str:
        if not (text.startswith(head) and text.endswith(tail)
                and len(text) >= len(head) + len(tail)):
            raise ValueError(f"cannot split the chat template's text {text!r} into "
                             f"{head!r} + ... + {tail!r}; this template is not supported")
        return text[len(head):len(text) - len(tail)]

    prefix_asst = strip(gaps[1], head=suffix_user)
    prefix_user = strip(gaps[2], head=suffix_asst)
    if gaps[3] != gaps[1] or gaps[4] != gaps[2]:
        raise ValueError("the chat template renders the same role differently at different turns; "
                         f"not supported: {gaps!r}")
    suffix_sys = strip(gaps[0], tail=prefix_user)
    head = full[:starts[0]]
    # BOS opens the conversation (Llama-3) unless it is the role marker itself (SmolLM2's GGUF
    # names "<|im_start|>" its BOS: it then belongs to every role's prefix).
    begin = (bos_token if bos_token and head.startswith(bos_token)
             and not prefix_user.startswith(bos_token) else "")
    gen = strip(with_gen, head=full)
    return ChatPieces(begin=begin, prefix={"system": head[len(begin):], "user": prefix_user,
                                           "assistant": prefix_asst},
                      suffix={"system": suffix_sys, "user": suffix_user, "assistant": suffix_asst},
                      generation_prompt=gen)


def _generation_config_eos(path: str) -> list[int]:
    """eos_token_id(s) of a generation_config.json next to the tokenizer (Qwen lists two)."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return []
    with open(file) as f:
        eos = json.load(f).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _load_hf(path: str, gguf_file: str | None = None) -> HFTokenizer:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many types; say what to change
        what = f"the GGUF file {os.path.join(path, gguf_file)!r}" if gguf_file else repr(path)
        raise ValueError(f"could not load a transformers tokenizer from {what}: {e}") from e
    template = hf.chat_template
    if isinstance(template, dict):  # several named templates: use the default one
        template = template.get("default")
    if template:
        def render(messages, add_generation_prompt):
            return hf.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        try:
            pieces = pieces_from_chat_template(render, hf.bos_token)
        except Exception as e:  # a template may raise on a system role, jinja errors, ...
            raise ValueError(f"cannot use the chat template of {path!r}: loopjax needs one that "
                             f"renders system, user and assistant messages ({e})") from e
    elif IM_START in hf.get_vocab() and IM_END in hf.get_vocab():
        pieces = chatml_pieces()
    else:
        raise ValueError(f"tokenizer at {path!r} has no chat template and no {IM_START}/{IM_END} "
                         "special tokens; add a chat_template to its tokenizer_config.json")
    return HFTokenizer(hf, pieces, _generation_config_eos(path))


# ----------------------------------------------------------------------------- SentencePiece
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with ChatML chat pieces; see `train_sentencepiece`."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._proto = model_proto
        self.vocab_size = self.sp.get_piece_size()
        for marker in (IM_START, IM_END):
            if self.sp.piece_to_id(marker) == self.sp.unk_id():
                raise ValueError(f"SentencePiece model lacks the ChatML marker {marker!r}; "
                                 "train it with train_sentencepiece")
        self._specials = [IM_START, IM_END]
        self._space_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPM_SPACE.encode()]
        self.pieces = chatml_pieces()
        self.eos_ids = frozenset({self.sp.eos_id()} - {-1})
        self._finish_init()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.end_of_turn_id

    def encode(self, text: str) -> list[int]:
        # A marker in content is encoded in two halves so it stays characters, and a literal
        # U+2581 as raw bytes because SentencePiece would decode its own space symbol as " ".
        ids: list[int] = []
        for seg, special in _split_specials(text, self._specials + [SPM_SPACE]):
            if seg == SPM_SPACE:
                ids += self._space_bytes
            elif special:
                ids += self.sp.encode(seg[:1]) + self.sp.encode(seg[1:])
            else:
                ids += self.sp.encode(seg)
        return ids

    def _encode_markup(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def save(self, out_dir: str) -> None:
        """Write the model and a marker file that `load_tokenizer` detects."""
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, SPM_MODEL_FILE), "wb") as f:
            f.write(self._proto)
        with open(os.path.join(out_dir, SPM_META_FILE), "w") as f:
            json.dump({"format": "sentencepiece", "chat_format": "chatml",
                       "model": SPM_MODEL_FILE}, f)


def train_sentencepiece(corpus: Iterable[str], out_dir: str, vocab_size: int = 1024,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
    """Train a SentencePiece model on `corpus` (strings, e.g. one document each), save it to
    `out_dir`, and return it. Settings are chosen so that code round-trips exactly:
    identity normalization, no dummy prefix, no whitespace squashing, whitespace-only pieces
    allowed (indentation), byte fallback for unseen characters, digits split. ids: 0 <pad>,
    1 <unk>, 2 <s>, 3 </s>, then <|im_start|> and <|im_end|>. `vocab_size` is an upper bound
    (a small corpus yields fewer pieces); it must leave room for the 256 byte pieces.
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small: 256 byte pieces + specials "
                         "+ the corpus characters need at least 300")
    texts = [t for t in corpus if t]
    if not texts:
        raise ValueError("train_sentencepiece: the corpus is empty")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, byte_fallback=True,
            allow_whitespace_only_pieces=True, split_digits=True, character_coverage=1.0,
            hard_vocab_limit=False, user_defined_symbols=[IM_START, IM_END],
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_sentence_length=1 << 24,
            num_threads=2, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {e}") from e
    tok = SentencePieceTokenizer(buf.getvalue())
    tok.save(out_dir)
    return tok


# ----------------------------------------------------------------------------- loading
def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a LOCAL folder: one saved by `train_sentencepiece`, or a
    transformers tokenizer (tokenizer.json or tokenizer_config.json) with its chat template.
    A folder with only a `tokenizer.model` is read as a SentencePiece model with ChatML markers.
    A .gguf file (or a folder holding one and no safetensors, or a short name such as "smollm2",
    see loopjax.models.hf_io.MODEL_PACKAGES) gives the tokenizer and chat template stored in it."""
    from loopjax.models.hf_io import _gguf_readers, find_gguf  # noqa: PLC0415

    path = os.fspath(path)
    gguf = find_gguf(path)
    if gguf is not None:
        _gguf_readers()  # a clear error when gguf / torch are missing
        return _load_hf(os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist (loopjax never "
                                "downloads; pass a local folder)")
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    if has(SPM_META_FILE):
        with open(os.path.join(path, SPM_META_FILE)) as f:
            model = json.load(f).get("model", SPM_MODEL_FILE)
        with open(os.path.join(path, model), "rb") as f:
            return SentencePieceTokenizer(f.read())
    if has("tokenizer.json") or has("tokenizer_config.json"):
        return _load_hf(path)
    if has("tokenizer.model"):
        with open(os.path.join(path, "tokenizer.model"), "rb") as f:
            return SentencePieceTokenizer(f.read())
    raise FileNotFoundError(f"no tokenizer in {path!r}: expected {SPM_META_FILE} (from "
                            "train_sentencepiece), tokenizer.json / tokenizer_config.json "
                            f"(transformers) or tokenizer.model; found {sorted(os.listdir(path))}")
