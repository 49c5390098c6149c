"""The sampling engine: HF greedy parity, exact multi-turn log-probs with LoRA, slot reuse,
sharded == single-device, bounded compiles, clear errors.

All tests share one tiny Qwen2 checkpoint and the same engine shapes, so compiled programs are
reused across tests (one Programs per config, loopjax.sampling.programs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import make_checkpoint
from loopjax.models.hf_io import load_hf_checkpoint
from loopjax.models.lora import LoraConfig, init_lora
from loopjax.models.transformer import token_logprobs
from loopjax.sampling import CONTEXT_FULL, MAX_NEW, STOP, SamplingEngine, generate
from loopjax.sampling.sample import sample_tokens
from loopjax.sharding import make_mesh, param_shardings

SLOTS, MAX_LEN, STOP_ID, PAGE = 4, 128, 7, 8


def _engine(config, stop_ids=(STOP_ID,), **kw):
    """Every test uses these shapes, so the compiled programs are shared across tests. Pages of
    8 positions: an episode here spans many of them."""
    return SamplingEngine(config, SLOTS, MAX_LEN, stop_ids=stop_ids, prefill_chunk=32,
                          decode_steps=16, page_size=PAGE, **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    hf_model = make_checkpoint(path, "qwen2")
    config, params = load_hf_checkpoint(str(path))
    lora = init_lora(config, LoraConfig(rank=4, alpha=8.0), jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 64))
    lora = lora.replace(weights=jax.tree.map(  # random nonzero B so the adapter matters
        lambda x: 0.05 * jax.random.normal(next(keys), x.shape), lora.weights))
    return config, params, lora, hf_model, str(path)


def _prompt(n, seed, vocab=128):
    return np.random.default_rng(seed).integers(8, vocab, n).tolist()  # ids >= 8 avoid STOP_ID


def _run_episode(engine, params, lora, slot, key, prompt, replies, temperature=1.0, max_new=12):
    """Drives one multi-turn episode on `slot`; returns tokens, output mask, sampler log-probs."""
    tokens, is_out, logps, reasons = list(prompt), [0] * len(prompt), [0.0] * len(prompt), []
    engine.add(slot, prompt, key=key, max_new_tokens=max_new, temperature=temperature)
    for turn in range(len(replies) + 1):
        (g,) = [g for g in engine.generate(params, lora) if g.slot == slot]
        tokens += g.ids.tolist()
        is_out += [1] * len(g.ids)
        logps += g.logps.tolist()
        reasons.append(g.stop_reason)
        if turn < len(replies):
            tokens += replies[turn]
            is_out += [0] * len(replies[turn])
            logps += [0.0] * len(replies[turn])
            engine.add(slot, replies[turn], max_new_tokens=max_new, temperature=temperature)
    return np.array(tokens), np.array(is_out, bool), np.array(logps), reasons


def test_greedy_matches_transformers_generate(model):
    config, params, _, hf_model, _ = model
    prompts = [_prompt(9, 0), _prompt(23, 1)]
    engine = _engine(config, stop_ids=())  # no stop id: 64 tokens, as HF with eos_token_id=None
    for slot, prompt in enumerate(prompts):
        engine.add(slot, prompt, key=jax.random.key(slot), max_new_tokens=64, temperature=0.0)
    gens = engine.generate(params)
    for prompt, g in zip(prompts, gens, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
        np.testing.assert_array_equal(g.ids, ref[0, len(prompt):].numpy())
        assert g.stop_reason == MAX_NEW and len(g.ids) == 64


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_learner_recompute_multi_turn(model, temperature):
    config, params, lora, _, _ = model
    engine = _engine(config)
    replies = [_prompt(5, 10), _prompt(11, 11), _prompt(3, 12)]
    tokens, is_out, logps, reasons = _run_episode(engine, params, lora, 1, jax.random.key(3),
                                                  _prompt(17, 2), replies, temperature)
    assert len(reasons) == 4 and is_out.sum() >= 4
    ref = np.asarray(token_logprobs(config, params, jnp.asarray(tokens[None]), lora=lora,
                                    temperature=temperature))[0]
    diff = np.abs(ref[is_out] - logps[is_out]).max()
    print(f"fp32 max |sampler - learner| logp at T={temperature}: {diff:.2e}")
    assert diff <= 1e-5
    assert np.all(logps[is_out] < 0)


def test_unrolled_layers_equal_the_layer_scan(model):
    """The engine's two layer loops (unrolled over split weights, CPU's default; a scan over the
    stacked ones, elsewhere) sample the same tokens with the same log-probs."""
    config, params, lora, _, _ = model
    runs, engines = {}, {}
    for unroll in (True, False):
        engines[unroll] = _engine(config, unroll_layers=unroll)
        runs[unroll] = _run_episode(engines[unroll], params, lora, 2, jax.random.key(5),
                                    _prompt(13, 3), [_prompt(6, 13)])
    (tok_u, out_u, lp_u, _), (tok_s, out_s, lp_s, _) = runs[True], runs[False]
    np.testing.assert_array_equal(tok_u, tok_s)
    np.testing.assert_array_equal(out_u, out_s)
    assert out_u.sum() >= 4
    np.testing.assert_allclose(lp_u, lp_s, atol=1e-6)  # measured: equal
    # New params (another adapter) on the same engine: its kept split is replaced, not reused.
    other = lora.replace(weights=jax.tree.map(lambda x: -2.0 * x, lora.weights))
    engines[True].free(2)
    engines[True].reset_prefix_cache()
    tokens, is_out, logps, _ = _run_episode(engines[True], params, other, 2, jax.random.key(5),
                                            _prompt(13, 3), [_prompt(6, 13)])
    ref = np.asarray(token_logprobs(config, params, jnp.asarray(tokens[None]), lora=other))[0]
    np.testing.assert_allclose(logps[is_out], ref[is_out], atol=1e-5)


def test_bf16_logprobs_close(model):
    """bf16 params and cache: the sampler's log-probs still track the learner's (figure in docs)."""
    config, params, lora, _, path = model
    config16, params16 = load_hf_checkpoint(path, dtype="bfloat16")
    engine = _engine(config16)
    tokens, is_out, logps, _ = _run_episode(engine, params16, lora, 0, jax.random.key(4),
                                            _prompt(17, 2), [_prompt(5, 10)])
    ref = np.asarray(token_logprobs(config16, params16, jnp.asarray(tokens[None]), lora=lora))[0]
    diff = np.abs(ref[is_out] - logps[is_out]).max()
    print(f"bf16 max |sampler - learner| logp: {diff:.2e}")
    # Measured 9.5e-7 on the 2-core CPU (both paths run the same bf16 projections): about 5x that.
    assert diff < 5e-6, diff


def test_slot_reuse_and_batch_independence(model):
    config, params, lora, _, _ = model
    replies = [_prompt(6, 20)]
    fresh = _engine(config)
    expected = _run_episode(fresh, params, lora, 0, jax.random.key(5), _prompt(12, 21), replies)

    dirty = _engine(config)
    # Fill slot 2 with a long, different episode (a longer cache than the next one), then free it.
    _run_episode(dirty, params, lora, 2, jax.random.key(6), _prompt(40, 22), [_prompt(30, 23)],
                 max_new=20)
    dirty.free(2)
    # Another slot stays busy mid-episode while the reused slot runs: the draws must not change.
    dirty.add(3, _prompt(25, 24), key=jax.random.key(7), max_new_tokens=30)
    got = _run_episode(dirty, params, lora, 2, jax.random.key(5), _prompt(12, 21), replies)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[2], expected[2], atol=1e-5)


def _episodes_together(engine, params, lora, prompts, replies, max_new=10):
    """One episode per slot, all started in the same prefill; each gets `replies` (a turn each).
    Returns per slot (tokens, output mask, sampler log-probs)."""
    conv = [(list(p), [0] * len(p), [0.0] * len(p)) for p in prompts]
    for slot, p in enumerate(prompts):
        engine.add(slot, p, key=jax.random.key(40 + slot), max_new_tokens=max_new)
    for turn in range(len(replies) + 1):
        for g in engine.generate(params, lora):
            tokens, is_out, logps = conv[g.slot]
            tokens += g.ids.tolist()
            is_out += [1] * len(g.ids)
            logps += g.logps.tolist()
            if turn < len(replies) and g.stop_reason != CONTEXT_FULL:
                reply = replies[turn] + [8 + g.slot]  # replies that differ between episodes
                tokens += reply
                is_out += [0] * len(reply)
                logps += [0.0] * len(reply)
                engine.add(g.slot, reply, max_new_tokens=max_new)
    return [(np.array(t), np.array(o, bool), np.array(lp)) for t, o, lp in conv]


def _check_learner(config, params, lora, runs):
    for tokens, is_out, logps in runs:
        ref = np.asarray(token_logprobs(config, params, jnp.asarray(tokens[None]), lora=lora))[0]
        assert is_out.sum() >= 3 and np.abs(ref[is_out] - logps[is_out]).max() <= 1e-5


def _same_runs(a, b):
    for (t0, o0, lp0), (t1, o1, lp1) in zip(a, b, strict=True):
        np.testing.assert_array_equal(t0, t1)
        np.testing.assert_array_equal(o0, o1)
        # fp32: a prefill of another batch shape may round the last bit differently (measured
        # <= 9.5e-7).
        np.testing.assert_allclose(lp0, lp1, atol=1e-5)


def test_shared_prompts_prefill_once_and_sample_the_same(model):
    """Three episodes with one prompt (a task's rollouts) and one with another: with
    share_prompts the common prompt's full pages are computed once and mapped into the other two
    slots (which compute only the last, partial page); the tokens drawn are the same as without,
    and every log-prob is the learner's recompute."""
    config, params, lora, _, _ = model
    prompt, other = _prompt(37, 50), _prompt(37, 51)  # same length, other tokens
    prompts, replies = [prompt, prompt, prompt, other], [_prompt(4, 52), _prompt(6, 53)]
    runs = {}
    cached = (len(prompt) - 1) // PAGE * PAGE  # the prompt's full pages (its last token is fed)
    for share in (False, True):
        engine = _engine(config, share_prompts=share)
        runs[share] = _episodes_together(engine, params, lora, prompts, replies)
        assert engine.prefill_shared_tokens == (2 * cached if share else 0)
        first = (len(prompt) - 1) * 3 + len(other) - 1 - (2 * cached if share else 0)
        assert engine.prefill_tokens - first == sum(len(r) + 1 for r in replies) * SLOTS
    _same_runs(runs[False], runs[True])
    assert len({tuple(t) for t, _, _ in runs[True][:3]}) == 3  # the episodes went their own ways
    _check_learner(config, params, lora, runs[True])


def test_prefix_cache_across_prefills_and_its_reset(model):
    """Episodes that start later reuse the cached pages of a common prefix (a system prompt)
    computed by earlier ones, never a page whose tokens match but whose prefix does not, and
    nothing after reset_prefix_cache(); every draw equals the unshared engine's."""
    config, params, lora, _, _ = model
    system = _prompt(3 * PAGE, 60)
    a, b = system + _prompt(13, 61), system + _prompt(21, 62)
    # c's first page is system's second: same tokens at another position (must not be shared).
    c = system[PAGE:2 * PAGE] + _prompt(30, 63)
    replies = [_prompt(5, 64)]
    runs, shared = {}, {}
    for share in (False, True):
        engine = _engine(config, share_prompts=share)
        runs[share] = _episodes_together(engine, params, lora, [a], replies)
        for slot in range(SLOTS):
            engine.free(slot)
        counts = []
        for prompts, reset in (([b, c], False), ([b], True)):
            if reset:
                for slot in range(SLOTS):
                    engine.free(slot)
                engine.reset_prefix_cache()
            before = engine.prefill_shared_tokens
            runs[share] += _episodes_together(engine, params, lora, prompts, replies)
            counts.append(engine.prefill_shared_tokens - before)
        shared[share] = counts
    # b maps the system prompt's 3 pages and a's tokens... only where they are b's too; c none.
    assert shared == {False: [0, 0], True: [3 * PAGE, 0]}, shared
    _same_runs(runs[False], runs[True])
    _check_learner(config, params, lora, runs[True])


def test_pages_follow_the_tokens_held(model):
    """The pool grows from one short bucket per slot while an episode is in the middle of its
    turns (its draws do not change), a slot holds ceil(length / page) pages, and freeing every
    slot returns every page; the pool never exceeds the slots x max_len reservation."""
    config, params, lora, _, _ = model
    replies = [_prompt(10, 71), _prompt(8, 72)]
    solo = _episodes_together(_engine(config), params, lora, [_prompt(40, 70)], replies, max_new=12)
    engine = _engine(config)
    start = engine.num_pages
    assert start * PAGE == SLOTS * 64 < SLOTS * MAX_LEN  # one 64-position bucket per slot
    together = _episodes_together(engine, params, lora,
                                  [_prompt(40, 70)] + [_prompt(60, 73 + i) for i in range(3)],
                                  replies, max_new=12)
    assert start < engine.num_pages <= SLOTS * MAX_LEN // PAGE
    _same_runs(solo, together[:1])
    for slot in range(SLOTS):  # the pages its positions need, and at most a decode call's more
        held, length = engine.pool.held[slot], engine.slots[slot].length
        assert -(-length // PAGE) <= held <= -(-(length + 16) // PAGE), (slot, held, length)
        engine.free(slot)
    # Every page is free again but those the prefix cache keeps (until its reset).
    pool = engine.pool
    assert not pool.refs.any() and 0 < pool.pinned.sum() == len(engine.tree)
    assert pool.num_free() == engine.num_pages - pool.pinned.sum()
    engine.reset_prefix_cache()
    assert pool.num_free() == engine.num_pages and len(engine.tree) == 0
    assert engine.peak_pages <= engine.num_pages
    assert engine.cache_bytes() == engine.num_pages * PAGE * engine.token_bytes()


def test_sharded_equals_single_device(model):
    config, params, lora, _, _ = model
    mesh = make_mesh("2,2,2")
    sh_params = jax.device_put(params, param_shardings(mesh, params))
    sh_lora = lora.replace(weights=jax.device_put(lora.weights,
                                                  param_shardings(mesh, lora.weights)))
    prompts = [_prompt(5 + 9 * i, 30 + i) for i in range(SLOTS)]
    kw = dict(key=jax.random.key(8), max_new_tokens=10, stop_ids=(STOP_ID,), max_len=MAX_LEN,
              prefill_chunk=32, decode_steps=16)
    single = generate(config, params, prompts, lora=lora, **kw)
    sharded = generate(config, sh_params, prompts, lora=sh_lora, mesh=mesh, **kw)
    assert sharded[0].logps.shape == (10,) or sharded[0].stop_reason == STOP
    for a, b in zip(single, sharded, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logps, b.logps, atol=1e-5)


def test_bounded_compiles_over_varied_prompts(model):
    config, params, _, _, _ = model
    engine = _engine(config)
    rng = np.random.default_rng(0)
    before = dict(engine.programs.traces)  # shared with earlier tests' engines of this config
    finished, key = 0, jax.random.key(9)
    for slot in range(SLOTS):  # continuous batching: refill each slot as soon as it frees up
        engine.add(slot, _prompt(int(rng.integers(1, 80)), slot), key=jax.random.fold_in(key, slot),
                   max_new_tokens=int(rng.integers(1, 40)))
    started = SLOTS
    while engine.busy():
        for g in engine.step(params):
            finished += 1
            assert g.stop_reason in (STOP, MAX_NEW) and len(g.ids) == len(g.logps) >= 1
            engine.free(g.slot)
            if started < 24:
                engine.add(g.slot, _prompt(int(rng.integers(1, 80)), started),
                           key=jax.random.fold_in(key, started),
                           max_new_tokens=int(rng.integers(1, 40)))
                started += 1
    assert finished == 24
    new = {k: engine.programs.traces[k] - before.get(k, 0) for k in ("prefill", "decode")}
    # rows in {1, 2, 4} x cache windows in {64, 128} x pool sizes in {32, 64} pages (x prefill
    # chunks {16, 32}), some already compiled by earlier tests: a fixed bound, not one program
    # per prompt length.
    assert engine.num_pages in (32, 64)
    assert new["decode"] <= 12 and new["prefill"] <= 24, new
    print("new traces over 24 episodes:", new)


def test_context_full_and_errors(model):
    config, params, _, _, _ = model
    engine = _engine(config)
    with pytest.raises(ValueError, match="needs key"):
        engine.add(0, [9, 10])
    engine.add(0, _prompt(110, 40), key=jax.random.key(0), max_new_tokens=100, temperature=0.0)
    with pytest.raises(ValueError, match="still queued"):
        engine.add(0, [9])
    (g,) = engine.generate(params)
    if g.stop_reason == CONTEXT_FULL:  # 110 prompt + 18 generated = 128 = max_len
        assert len(g.ids) == 18 and engine.length(0) == MAX_LEN
        with pytest.raises(ValueError, match="full"):
            engine.add(0, [9])
    with pytest.raises(ValueError, match="no room"):
        engine.add(1, _prompt(MAX_LEN, 41), key=jax.random.key(1))
    with pytest.raises(ValueError, match="out of range"):
        engine.free(5)


def test_sample_tokens_truncation_and_greedy():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 2000)
    tok, logp = sample_tokens(logits, keys, jnp.ones(2000), top_p=0.7)
    assert set(np.unique(tok)) == {0, 1}  # 0.5 + 0.3 reaches 0.7: the rest is cut
    np.testing.assert_allclose(logp[tok == 0][0], np.log(0.5 / 0.8), atol=1e-6)
    tok, logp = sample_tokens(logits, keys, jnp.ones(2000), top_k=3)
    assert set(np.unique(tok)) == {0, 1, 2}
    tok, logp = sample_tokens(logits, keys, jnp.zeros(2000))
    assert np.all(tok == 0) and np.allclose(logp, np.log(0.5))
    tok, _ = sample_tokens(logits, keys, jnp.ones(2000))
    np.testing.assert_allclose(np.bincount(tok, minlength=4) / 2000, [0.5, 0.3, 0.15, 0.05],
                               atol=0.04)
    # jax.random.categorical's draws, key for key (the same Gumbel noise, one argmax).
    np.testing.assert_array_equal(tok, jax.vmap(jax.random.categorical)(keys, logits))
    # Greedy ties go to the first maximum, as jnp.argmax's.
    tied = jnp.array([[0.1, 0.7, 0.2, 0.7], [0.9, 0.9, 0.9, 0.1]])
    tok, _ = sample_tokens(tied, keys[:2], jnp.zeros(2))
    np.testing.assert_array_equal(tok, [1, 0])


def test_memory_estimate_is_the_arithmetic(model):
    """loopjax.memory's estimate: the params' bytes, the pool as it is, and every slot full."""
    from loopjax import memory  # noqa: PLC0415
    config, params, lora, _, _ = model
    engine = _engine(config)
    est = memory.estimate(engine, (params, lora.weights))
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4  # fp32 k and v
    assert engine.token_bytes() == est.cache_per_token == per_token
    assert est.weights == sum(x.size * 4 for x in jax.tree.leaves((params, lora.weights)))
    assert est.cache_now == engine.num_pages * PAGE * per_token == SLOTS * 64 * per_token
    assert est.cache_bound == SLOTS * MAX_LEN * per_token  # 128 = 16 whole pages per slot
    assert engine.unroll_layers  # on CPU the engine keeps a per-layer copy of the weights too
    assert est.sampler_copy == est.weights and "per-layer copy" in est.describe()
    assert (est.total_now == 2 * est.weights + est.cache_now
            and "KiB per token held" in est.describe())
    scanned = memory.estimate(_engine(config, unroll_layers=False), (params, lora.weights))
    assert scanned.sampler_copy == 0 and scanned.total_now == est.weights + est.cache_now
