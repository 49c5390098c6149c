"""LoRA export: the PEFT adapter and the merged checkpoint give loopjax's logits in transformers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers

from hf_fixtures import FAMILIES, hf_logits, make_checkpoint
from loopjax.models.export import export_merged, export_peft_adapter
from loopjax.models.hf_io import load_hf_checkpoint
from loopjax.models.lora import LoraConfig, init_lora
from loopjax.models.transformer import forward

TOL = 1e-4


def _random_lora(config, lora_config, seed=0):
    """Nonzero A and B, large enough that a transposed or misnamed tensor moves the logits."""
    lora = init_lora(config, lora_config, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return lora.replace(weights=jax.tree.map(
        lambda x: 0.1 * jax.random.normal(next(keys), x.shape), lora.weights))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"export_{family}")
    base = str(root / "base")
    make_checkpoint(base, family)
    config, params = load_hf_checkpoint(base)
    lora_config = LoraConfig(rank=4, alpha=12.0)  # scale 3, so a wrong alpha would show
    lora = _random_lora(config, lora_config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 13)).astype(np.int32)
    ours = np.asarray(forward(config, params, jnp.asarray(tokens), lora=lora))
    base_logits = np.asarray(forward(config, params, jnp.asarray(tokens)))
    adapter = export_peft_adapter(str(root / "adapter"), config, lora, lora_config,
                                  base_model_path=base)
    merged = export_merged(str(root / "merged"), config, params, lora)
    return dict(base=base, adapter=adapter, merged=merged, tokens=tokens, ours=ours,
                base_logits=base_logits, config=config, lora_config=lora_config)


def test_peft_adapter_matches_loopjax(exported):
    import peft
    base_model = transformers.AutoModelForCausalLM.from_pretrained(exported["base"])
    model = peft.PeftModel.from_pretrained(base_model, exported["adapter"]).eval()
    ref = hf_logits(model, exported["tokens"])
    # The adapter must change the model, else the comparison proves nothing.
    assert np.abs(exported["ours"] - exported["base_logits"]).max() > 1e-2
    np.testing.assert_allclose(exported["ours"], ref, atol=TOL, rtol=0)


def test_merged_checkpoint_matches_loopjax(exported):
    model = transformers.AutoModelForCausalLM.from_pretrained(exported["merged"]).eval()
    np.testing.assert_allclose(exported["ours"], hf_logits(model, exported["tokens"]), atol=TOL,
                               rtol=0)


def test_adapter_folder_contents(exported):
    with open(os.path.join(exported["adapter"], "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 12.0 and cfg["lora_dropout"] == 0.0
    assert cfg["bias"] == "none" and cfg["base_model_name_or_path"] == exported["base"]
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                     "gate_proj", "up_proj", "down_proj"]
    tensors = safetensors.numpy.load_file(os.path.join(exported["adapter"],
                                                       "adapter_model.safetensors"))
    config = exported["config"]
    assert len(tensors) == 2 * 7 * config.num_layers
    q_out = config.num_heads * config.head_dim
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (
        4, config.hidden_size)
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (
        q_out, 4)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (
        4, config.intermediate_size)


def test_subset_targets_and_bf16(tmp_path):
    """An attention-only adapter lists only its targets; dtype="bfloat16" writes BF16 tensors."""
    from loopjax.models.config import ModelConfig
    config = ModelConfig()
    lora_config = LoraConfig(rank=2, alpha=2.0, targets=("q_proj", "v_proj"))
    lora = _random_lora(config, lora_config)
    out = export_peft_adapter(str(tmp_path / "a"), config, lora, lora_config, dtype="bfloat16")
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["target_modules"] == ["q_proj", "v_proj"]
    with open(os.path.join(out, "adapter_model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_errors_and_tokenizer_copy(tmp_path):
    from loopjax.models.config import ModelConfig
    from loopjax.models.transformer import init_params
    config = ModelConfig()
    lora_config = LoraConfig(rank=2, alpha=4.0)
    lora = _random_lora(config, lora_config)
    with pytest.raises(ValueError, match="lora_config.targets"):
        export_peft_adapter(str(tmp_path / "x"), config, lora,
                            LoraConfig(rank=2, targets=("q_proj",)))
    with pytest.raises(ValueError, match="need a"):
        export_peft_adapter(str(tmp_path / "x"), config, lora, LoraConfig(rank=3, alpha=6.0))
    with pytest.raises(ValueError, match="scale"):
        export_peft_adapter(str(tmp_path / "x"), config, lora, LoraConfig(rank=2, alpha=8.0))

    params = init_params(config, jax.random.key(0))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "model.safetensors").write_text("not copied")
    out = export_merged(str(tmp_path / "m"), config, params, lora, tokenizer_dir=str(tok))
    names = set(os.listdir(out))
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= names
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_merged(str(tmp_path / "m2"), config, params, lora, tokenizer_dir=str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_merged(str(tmp_path / "m3"), config, params, lora,
                      tokenizer_dir=str(tmp_path / "nope"))
