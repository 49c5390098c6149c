"""The policy model against transformers' PyTorch models, sharded vs single-device, LoRA, errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import FAMILIES, hf_logits, make_checkpoint
from loopjax.models.config import ModelConfig
from loopjax.models.cpu_layout import FEW_ROWS, matmul_t, sampler_layout
from loopjax.models.hf_io import load_hf_checkpoint, save_hf_checkpoint
from loopjax.models.kv_cache import KVCache, init_cache
from loopjax.models.lora import LoraConfig, init_lora, merge_lora
from loopjax.models.transformer import forward, init_params, token_logprobs
from loopjax.sharding import batch_sharding, make_mesh, param_shardings

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(path, request.param)
    return request.param, str(path), model


def _tokens(shape, seed=0, vocab=128):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def test_config_maps_family(checkpoint):
    family, path, _ = checkpoint
    config, _ = load_hf_checkpoint(path)
    assert config.family == family
    assert config.qkv_bias == (family == "qwen2") and config.qk_norm == (family == "qwen3")
    assert (config.rope_scaling is not None) == (family == "llama")


def test_parity_padded_batch(checkpoint):
    _, path, model = checkpoint
    config, params = load_hf_checkpoint(path)
    tokens = _tokens((3, 17))
    lengths = np.array([17, 11, 4])
    mask = (np.arange(17)[None] < lengths[:, None]).astype(np.int32)
    tokens = np.where(mask, tokens, 0)
    ref = hf_logits(model, tokens, mask)
    ours = np.asarray(forward(config, params, jnp.asarray(tokens),
                              segment_ids_BxT=jnp.asarray(mask)))
    for b, n in enumerate(lengths):  # right padding: only real positions are compared
        np.testing.assert_allclose(ours[b, :n], ref[b, :n], atol=TOL, rtol=0)


@pytest.mark.parametrize("attention_chunk", [0, 7])
def test_parity_packed_segments(checkpoint, attention_chunk):
    """Packed rows against transformers, with one attention block and with blocks of 7 queries
    (20 tokens: blocks [0, 7), [7, 14), [14, 20), a segment crossing each boundary)."""
    _, path, model = checkpoint
    config, params = load_hf_checkpoint(path)
    config = config.replace(attention_chunk=attention_chunk)
    seg_lengths = [6, 9, 3]
    seqs = [_tokens((1, n), seed=i + 1) for i, n in enumerate(seg_lengths)]
    T = 20
    tokens = np.zeros((1, T), np.int32)
    segment_ids = np.zeros((1, T), np.int32)
    positions = np.zeros((1, T), np.int32)
    start = 0
    for i, s in enumerate(seqs):
        n = s.shape[1]
        tokens[0, start:start + n], segment_ids[0, start:start + n] = s[0], i + 1
        positions[0, start:start + n] = np.arange(n)
        start += n
    ours = np.asarray(forward(config, params, jnp.asarray(tokens),
                              positions_BxT=jnp.asarray(positions),
                              segment_ids_BxT=jnp.asarray(segment_ids)))
    start = 0
    for s in seqs:
        n = s.shape[1]
        np.testing.assert_allclose(ours[0, start:start + n], hf_logits(model, s)[0], atol=TOL,
                                   rtol=0)
        start += n

    # token_logprobs: log-softmax of the reference logits at the previous position, 0 at segment
    # starts.
    logp = np.asarray(token_logprobs(config, params, jnp.asarray(tokens),
                                     positions_BxT=jnp.asarray(positions),
                                     segment_ids_BxT=jnp.asarray(segment_ids)))
    start = 0
    for s in seqs:
        n = s.shape[1]
        ref = hf_logits(model, s)[0].astype(np.float64)
        ref = (ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True))
               - ref.max(-1, keepdims=True))
        expected = [0.0] + [ref[t - 1, s[0, t]] for t in range(1, n)]
        np.testing.assert_allclose(logp[0, start:start + n], expected, atol=TOL, rtol=0)
        start += n
    assert np.all(logp[0, start:] == 0.0)


def test_token_logprobs_chunking_and_temperature(checkpoint):
    _, path, _ = checkpoint
    config, params = load_hf_checkpoint(path)
    tokens = jnp.asarray(_tokens((2, 13)))
    logits = forward(config, params, tokens) / 0.7
    full = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    expected = jnp.take_along_axis(full, tokens[:, 1:, None], axis=-1)[..., 0]
    chunked = token_logprobs(config.replace(logits_chunk=5), params, tokens, temperature=0.7)
    np.testing.assert_allclose(chunked[:, 1:], expected, atol=1e-5)
    assert np.all(np.asarray(chunked[:, 0]) == 0)


@pytest.mark.parametrize("paged", [False, True])
def test_kv_cache_matches_full_forward(checkpoint, paged):
    """Prefill and decode through the cache equal the full forward, with a contiguous cache and
    with a paged one whose pages are out of order (and a page no row owns stays untouched)."""
    _, path, _ = checkpoint
    config, params = load_hf_checkpoint(path)
    tokens = jnp.asarray(_tokens((2, 12)))
    full = forward(config, params, tokens)
    cache = init_cache(config, batch=2, max_len=16)
    if paged:  # 9 pages of 4 positions; rows own 4 pages each, page 4 is nobody's
        pool = jnp.zeros((config.num_layers, 9, 4, config.num_kv_heads, config.head_dim))
        table = jnp.array([[7, 2, 5, 0], [3, 8, 1, 6]], jnp.int32)
        cache = KVCache(pool, pool, cache.lengths_B, table)
    # Row 1 gets its first chunk in two pieces, padded: a right-padded prefill with ragged lengths.
    seg = jnp.array([[1] * 5, [1] * 3 + [0] * 2])
    l1, cache = forward(config, params, tokens[:, :5], segment_ids_BxT=seg, cache=cache)
    np.testing.assert_array_equal(cache.lengths_B, [5, 3])
    step2 = jnp.stack([tokens[0, 5:9], tokens[1, 3:7]])
    l2, cache = forward(config, params, step2, cache=cache)
    np.testing.assert_allclose(l1[0], full[0, :5], atol=TOL)
    np.testing.assert_allclose(l1[1, :3], full[1, :3], atol=TOL)
    np.testing.assert_allclose(l2[0], full[0, 5:9], atol=TOL)
    np.testing.assert_allclose(l2[1], full[1, 3:7], atol=TOL)
    for t in range(9, 12):  # one-token decode steps on row 0, row 1 idle (padding)
        step = jnp.array([[tokens[0, t]], [0]])
        lt, cache = forward(config, params, step, segment_ids_BxT=jnp.array([[1], [0]]),
                            cache=cache)
        np.testing.assert_allclose(lt[0, 0], full[0, t], atol=TOL)
    np.testing.assert_array_equal(cache.lengths_B, [12, 7])
    if paged:
        assert cache.max_len == 16 and not np.any(np.asarray(cache.k_LxBxSxHkxDh[:, 4]))


@pytest.mark.parametrize("rows", [1, FEW_ROWS, FEW_ROWS + 1])
def test_matmul_t_is_x_times_w_transposed(rows):
    """matmul_t on few rows (computed as the transposed product) and on more rows is x W^T."""
    rng = np.random.default_rng(rows)
    x, w = rng.normal(size=(rows, 1, 24)), rng.normal(size=(40, 24))
    got = matmul_t(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)


def test_sampler_layout_equals_stacked_params(checkpoint):
    """The sampler's CPU layout (layers split, fp32 kernels transposed) gives the stacked params'
    logits, on few rows and on more; bf16 kernels stay as they are."""
    _, path, _ = checkpoint
    config, params = load_hf_checkpoint(path)
    layout, _ = sampler_layout(params)
    q_proj = layout["layers"][0]["q_proj"]
    assert "kernel_t" in q_proj and "kernel" not in q_proj
    for shape in [(2, 12), (3, 12)]:  # 24 rows (<= FEW_ROWS) and 36
        tokens = jnp.asarray(_tokens(shape))
        np.testing.assert_allclose(forward(config, layout, tokens), forward(config, params, tokens),
                                   atol=TOL)
    _, params16 = load_hf_checkpoint(path, dtype="bfloat16")
    assert "kernel" in sampler_layout(params16)[0]["layers"][0]["q_proj"]


def test_sharded_forward_equals_single_device(checkpoint):
    _, path, _ = checkpoint
    assert jax.device_count() == 8, "conftest must force 8 CPU devices"
    config, params = load_hf_checkpoint(path)
    mesh = make_mesh("2,2,2")
    _, sharded = load_hf_checkpoint(path, mesh=mesh)
    q = sharded["layers"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[1:] == (
        config.hidden_size // 2, config.num_heads * config.head_dim // 2)
    tokens = jnp.asarray(_tokens((4, 10)))
    single = forward(config, params, tokens)
    fn = jax.jit(lambda p, t: forward(config, p, t),
                 in_shardings=(param_shardings(mesh, sharded), batch_sharding(mesh)))
    out = fn(sharded, jax.device_put(tokens, batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5)


def test_lora_zero_b_is_base_and_merge_matches(checkpoint):
    _, path, _ = checkpoint
    config, params = load_hf_checkpoint(path)
    tokens = jnp.asarray(_tokens((2, 9)))
    lora = init_lora(config, LoraConfig(rank=4, alpha=8.0), jax.random.key(0))
    base = forward(config, params, tokens)
    np.testing.assert_array_equal(forward(config, params, tokens, lora=lora), base)
    keys = iter(jax.random.split(jax.random.key(1), 32))
    weights = jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), lora.weights)
    lora = lora.replace(weights=weights)
    unmerged = forward(config, params, tokens, lora=lora)
    assert np.abs(np.asarray(unmerged - base)).max() > 1e-3
    np.testing.assert_allclose(forward(config, merge_lora(params, lora), tokens), unmerged,
                               atol=1e-5)


def test_save_roundtrip_and_sharded_index(tmp_path):
    import transformers
    path = tmp_path / "sharded"
    model = make_checkpoint(path, "qwen3", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    config, params = load_hf_checkpoint(str(path))
    tokens = _tokens((1, 8))
    np.testing.assert_allclose(forward(config, params, jnp.asarray(tokens)),
                               hf_logits(model, tokens), atol=TOL)
    out = tmp_path / "exported"
    save_hf_checkpoint(str(out), config, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(model, tokens), atol=1e-5)


def test_bf16_params_fp32_logits(checkpoint):
    _, path, model = checkpoint
    config, params = load_hf_checkpoint(path, dtype="bfloat16")
    assert params["layers"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    tokens = _tokens((1, 10))
    out = forward(config, params, jnp.asarray(tokens))
    assert out.dtype == jnp.float32
    # bf16 has ~3 significant digits; this checks the mapping, not fp32 parity.
    np.testing.assert_allclose(np.asarray(out), hf_logits(model, tokens), atol=0.1)


def test_remat_same_gradients():
    config = ModelConfig(qk_norm=True)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(_tokens((2, 8), vocab=config.vocab_size))
    def loss(cfg):
        return jax.grad(lambda p: token_logprobs(cfg, p, tokens).sum())(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 loss(config), loss(config.replace(remat=True)))


# ----------------------------------------------------------------------------- clear errors


def test_error_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(str(tmp_path / "nope"))


def test_error_missing_weight_file(tmp_path):
    make_checkpoint(tmp_path, "llama")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_hf_checkpoint(str(tmp_path))
    sharded = tmp_path / "sharded"
    make_checkpoint(sharded, "llama", max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[0]
    os.remove(sharded / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_hf_checkpoint(str(sharded))


def test_error_unsupported_architecture(tmp_path):
    make_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        load_hf_checkpoint(str(tmp_path))


def test_error_shape_mismatch(tmp_path):
    make_checkpoint(tmp_path, "qwen2")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gate_proj.*shape"):
        load_hf_checkpoint(str(tmp_path))


def test_error_corrupt_weight_file(tmp_path):
    make_checkpoint(tmp_path, "qwen2")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_hf_checkpoint(str(tmp_path))


def test_error_mesh_spec():
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh("3,2,1")
    with pytest.raises(ValueError, match="do not divide"):
        make_mesh("3,-1,1")
    with pytest.raises(ValueError, match="three"):
        make_mesh("2,2")
    assert make_mesh("1,-1,2").shape == {"data": 1, "fsdp": 4, "tensor": 2}


def test_unmatched_param_raises():
    mesh = make_mesh("1,-1,1")
    with pytest.raises(ValueError, match="no partition rule matches.*mystery"):
        param_shardings(mesh, {"layers": {"mystery": jnp.zeros((2, 4))}})
