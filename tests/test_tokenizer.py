"""Tokenizer loading, chat pieces from templates, SentencePiece round trips, and the Conversation.

Every tokenizer here is built offline: small BPE models trained with the `tokenizers` library and
wrapped in transformers.PreTrainedTokenizerFast with a chat template, and a SentencePiece model.
"""
import json
import os

import numpy as np
import pytest

from loopjax.agent.conversation import Conversation
from loopjax.models.tokenizer import (
    IM_END,
    IM_START,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    pieces_from_chat_template,
    train_sentencepiece,
)

CORPUS = [
    "Hello world, this is a user message.",
    "def f(x):\n    return {'a': [x, \"b\"]}\n\n\tz = 1  # ok\n",
    "apis.supervisor.complete_task(answer=42)\nprint(apis.api_docs.show_app_descriptions())",
    "The assistant writes code in fenced blocks.\n```python\nprint(1)\n```\n",
] * 4
CODE = ("def main(items):\n    total = 0\n\tfor i, x in enumerate(items):  # tab\n"
        "        total += x['price'] * 2   \n    return f\"{total:.2f}\"\n\n\n"
        "  leading spaces, trailing spaces   \n\r\nunicode: é€😀 \u2581 [({})] '\"` \\n 0123456789")

# Qwen2/Llama-3 style pre-tokenization: newlines group together, letters stay apart from them.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")

QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

QWEN3 = (  # thinking tags on an assistant message after the last user message, when it is last
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.index0 > ns.last_query and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + "
    "'<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}")

NO_SYSTEM = ("{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{%- endif %}" + QWEN3)

CHATML_SPECIALS = ["<|endoftext|>", IM_START, IM_END]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]


def make_hf_folder(folder, specials, template=None, **special_kwargs):
    """Train a byte-level BPE offline, wrap it as a transformers tokenizer, save it to `folder`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special_kwargs)
    hf.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    chatml = dict(eos_token=IM_END, pad_token="<|endoftext|>")
    return {
        "qwen25": make_hf_folder(root / "qwen25", CHATML_SPECIALS, QWEN25, **chatml),
        "qwen3": make_hf_folder(root / "qwen3", CHATML_SPECIALS, QWEN3, **chatml),
        "llama3": make_hf_folder(root / "llama3", LLAMA_SPECIALS, LLAMA3,
                                 bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        "chatml_no_template": make_hf_folder(root / "plain", CHATML_SPECIALS, None, **chatml),
        "no_chat_tokens": make_hf_folder(root / "bare", ["<unk>", "</s>"], None, eos_token="</s>"),
        "no_system": make_hf_folder(root / "nosys", CHATML_SPECIALS, NO_SYSTEM, **chatml),
        "spm": root / "spm",
    }


@pytest.fixture(scope="module")
def spm_tok(folders):
    return train_sentencepiece(iter(CORPUS * 5), str(folders["spm"]), vocab_size=400)


def hf_render(tok: HFTokenizer, messages, add_generation_prompt=False):
    msgs = [{"role": r, "content": c} for r, c in messages]
    text = tok.hf.apply_chat_template(msgs, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    return tok.hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name,prefix,suffix,gen,begin", [
    ("qwen25", {"system": "<|im_start|>system\n", "user": "<|im_start|>user\n",
                "assistant": "<|im_start|>assistant\n"},
     {r: "<|im_end|>\n" for r in ("system", "user", "assistant")}, "<|im_start|>assistant\n", ""),
    ("qwen3", {"system": "<|im_start|>system\n", "user": "<|im_start|>user\n",
               "assistant": "<|im_start|>assistant\n"},
     {r: "<|im_end|>\n" for r in ("system", "user", "assistant")}, "<|im_start|>assistant\n", ""),
    ("llama3", {"system": "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                          "December 2023\nToday Date: 26 Jul 2024\n\n",
                "user": "<|start_header_id|>user<|end_header_id|>\n\n",
                "assistant": "<|start_header_id|>assistant<|end_header_id|>\n\n"},
     {r: "<|eot_id|>" for r in ("system", "user", "assistant")},
     "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|begin_of_text|>"),
])
def test_pieces_derived_from_template(folders, name, prefix, suffix, gen, begin):
    tok = load_tokenizer(folders[name])
    assert isinstance(tok, HFTokenizer)
    # No default system message, no thinking tags, BOS split off as the conversation's start.
    assert dict(tok.pieces.prefix) == prefix and dict(tok.pieces.suffix) == suffix
    assert tok.pieces.generation_prompt == gen and tok.pieces.begin == begin
    assert tok.decode(tok.generation_prompt_ids()) == gen
    assert tok.decode(tok.turn_prefix_ids("user")) == prefix["user"]
    assert tok.decode(tok.begin_ids()) == begin
    end = tok.hf.convert_tokens_to_ids(suffix["assistant"][: suffix["assistant"].index(">") + 1])
    assert tok.end_of_turn_id == end and end in tok.eos_ids
    assert 0 <= tok.pad_id < tok.vocab_size == len(tok.hf)


@pytest.mark.parametrize("name", ["qwen25", "qwen3", "llama3", "chatml_no_template"])
def test_multi_turn_build_equals_template_rendering(folders, name):
    tok = load_tokenizer(folders[name])
    if name == "chatml_no_template":  # compare with the ChatML template it falls back to
        tok.hf.chat_template = QWEN25
    messages = [("system", "You are a helpful assistant."), ("user", "Hello world"),
                ("assistant", "```python\nprint(1)\n```"), ("user", "Output:\n1"),
                ("assistant", "def f(x):\n    return x"), ("user", "this is a user message.")]
    conv = Conversation(tok)
    conv_messages = []  # the messages before this one
    for role, text in messages:
        if role == "assistant":
            assert conv.start_assistant() == hf_render(tok, conv_messages, True)
            ids = tok.encode(text) + [tok.end_of_turn_id]
            conv.add_generated(ids, [-0.5] * len(ids))
        else:
            conv.add_message(role, text)
        conv_messages = messages[: messages.index((role, text)) + 1]
        if name == "qwen3" and role == "assistant":
            continue  # Qwen3 adds an empty <think> block to a FINAL assistant message only
        assert conv.tokens == hf_render(tok, conv_messages)
    assert conv.num_turns == 2 and conv.text_of_turn(1) == "def f(x):\n    return x"
    turn_BxT = conv.as_arrays()["turn_id"]
    assert (set(turn_BxT.tolist()) == {0, 1, 2}
            and ((turn_BxT > 0) == conv.as_arrays()["is_output"]).all())


def test_chatml_fallback_and_errors(folders, tmp_path):
    tok = load_tokenizer(folders["chatml_no_template"])
    assert tok.decode(tok.turn_prefix_ids("tool")) == "<|im_start|>tool\n"  # any role in ChatML
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(folders["no_chat_tokens"])
    with pytest.raises(ValueError, match="System role not supported"):
        load_tokenizer(folders["no_system"])
    with pytest.raises(KeyError, match="not in this chat template"):
        load_tokenizer(folders["llama3"]).turn_prefix_ids("tool")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not load"):
        load_tokenizer(tmp_path)


def test_template_that_drops_content_is_rejected():
    with pytest.raises(ValueError, match="exactly once"):
        pieces_from_chat_template(lambda msgs, gen: "".join(m["role"] for m in msgs))


def test_hf_encode_is_literal_and_round_trips(folders):
    tok = load_tokenizer(folders["qwen25"])
    text = f"print('{IM_END}')\n" + CODE
    ids = tok.encode(text)
    assert tok.hf.convert_tokens_to_ids(IM_END) not in ids  # content cannot end the turn
    assert tok.decode(ids) == text


def test_eos_ids_include_generation_config(folders, tmp_path):
    import shutil
    folder = shutil.copytree(folders["qwen25"], tmp_path / "q")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = load_tokenizer(folder)
    assert {0, 2, tok.hf.convert_tokens_to_ids(IM_END)} <= tok.eos_ids


def test_sentencepiece_round_trips_code(spm_tok, folders):
    loaded = load_tokenizer(folders["spm"])
    assert isinstance(loaded, SentencePieceTokenizer)
    assert sorted(os.listdir(folders["spm"])) == ["loopjax_tokenizer.json", "sentencepiece.model"]
    for tok in (spm_tok, loaded):
        for text in (CODE, " x", "\n\n", "    ", "", f"a{IM_START}b{IM_END}c", "\u2581\u2581"):
            ids = tok.encode(text)
            assert tok.decode(ids) == text, repr(text)
        assert tok.encode(CODE) == spm_tok.encode(CODE)
    assert spm_tok.vocab_size <= 400
    im_start, im_end = spm_tok.turn_prefix_ids("user")[0], spm_tok.end_of_turn_id
    assert im_start not in spm_tok.encode(IM_START) and im_end not in spm_tok.encode(IM_END)
    assert spm_tok.decode(spm_tok.message_ids("user", "hi")) == "<|im_start|>user\nhi<|im_end|>\n"
    assert spm_tok.decode(spm_tok.generation_prompt_ids()) == "<|im_start|>assistant\n"
    assert spm_tok.begin_ids() == [] and spm_tok.pad_id == 0 and im_end in spm_tok.eos_ids


def test_sentencepiece_bad_input(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(CORPUS, str(tmp_path), vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece(iter([]), str(tmp_path))


def test_generated_ids_are_never_retokenized(spm_tok):
    tok = spm_tok
    chars = [i for c in "return total" for i in tok.encode(c)]  # one id per character
    assert tok.encode(tok.decode(chars)) != chars                # re-encoding would merge them
    conv = Conversation(tok)
    conv.add_message("system", "sys")
    conv.add_message("user", "task")
    prompt = conv.start_assistant()
    ids = chars + [tok.end_of_turn_id]
    conv.add_generated(ids, [-float(i) for i in range(len(ids))])
    conv.add_message("user", "Output:\nok")
    arr = conv.as_arrays()
    n = len(prompt)
    assert conv.tokens[n:n + len(ids)] == ids
    assert arr["is_output"].sum() == len(ids) and arr["is_output"][n:n + len(ids)].all()
    assert arr["logp"][n:n + len(ids)].tolist() == [-float(i) for i in range(len(ids))]
    assert (arr["logp"][~arr["is_output"]] == 0).all()
    assert ((arr["turn_id"] > 0) == arr["is_output"]).all() and arr["turn_id"].max() == 1
    # Headers are not outputs; after <|im_end|> the suffix's "\n" follows as non-output.
    assert (tok.decode(conv.tokens[n - len(tok.generation_prompt_ids()):n])
            == "<|im_start|>assistant\n")
    suffix = tok.turn_suffix_ids("assistant")
    assert conv.tokens[n + len(ids):n + len(ids) + len(suffix) - 1] == suffix[1:]
    assert not arr["is_output"][n + len(ids):].any()
    assert conv.text_of_turn(0) == "return total" and conv.truncated_turns == []
    assert {k: v.dtype for k, v in arr.items()} == {
        "tokens": np.int32, "is_output": np.bool_, "logp": np.float32, "turn_id": np.int32}


def test_turn_cut_by_length_gets_a_non_output_end_of_turn(spm_tok):
    tok = spm_tok
    conv = Conversation(tok)
    conv.add_message("user", "task")
    conv.start_assistant()
    ids = tok.encode("print(1")  # the length limit stopped generation: no end-of-turn id
    start = len(conv)
    conv.add_generated(ids, [-1.0] * len(ids))
    suffix = tok.turn_suffix_ids("assistant")
    assert conv.tokens[start + len(ids):] == suffix and not any(conv.is_output[start + len(ids):])
    assert conv.truncated_turns == [0] and conv.text_of_turn(-1) == "print(1"
    conv.add_message("user", "more")                  # the next turn is well formed
    conv.start_assistant()
    conv.add_generated([], [])                        # an empty turn is closed the same way
    assert conv.truncated_turns == [0, 1] and conv.text_of_turn(1) == ""
    assert tok.decode(conv.tokens).endswith("<|im_start|>assistant\n<|im_end|>\n")
    eos_other = tok.sp.eos_id()                       # another eos id: the whole suffix follows
    conv.add_message("user", "again")
    conv.start_assistant()
    conv.add_generated([eos_other], [-0.1])
    assert conv.tokens[-len(suffix) - 1:] == [eos_other] + suffix and conv.truncated_turns == [0, 1]


def test_conversation_misuse(spm_tok):
    conv = Conversation(spm_tok)
    with pytest.raises(RuntimeError, match="start_assistant"):
        conv.add_generated([1], [0.0])
    conv.start_assistant()
    with pytest.raises(RuntimeError):
        conv.add_message("user", "x")
    with pytest.raises(ValueError, match="log-probs"):
        conv.add_generated([1, 2], [0.0])
    with pytest.raises(IndexError):
        conv.text_of_turn(0)
