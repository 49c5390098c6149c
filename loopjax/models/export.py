"""Trained LoRA out of loopjax, in the two forms serving stacks load.

- `export_peft_adapter`: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
  that `peft.PeftModel.from_pretrained(base, folder)` and vLLM's `--lora-modules name=folder` load
  on top of the unchanged base checkpoint.
- `export_merged`: a plain Hugging Face checkpoint with scale * A B folded into each kernel, for
  stacks that serve one model without adapters.

Layouts: loopjax keeps weights[proj]["a"] as L x in x r and ["b"] as L x r x out (x @ A @ B); PEFT's
torch Linear layers store lora_A.weight as r x in and lora_B.weight as out x r, so each is
transposed. PEFT applies scaling = lora_alpha / r, which is loopjax's `lora.scale`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.config import PROJECTIONS
from loopjax.models.config import ModelConfig
from loopjax.models.hf_io import save_hf_checkpoint, write_safetensors
from loopjax.models.lora import LoRA, LoraConfig, merge_lora
from loopjax.models.transformer import projection_shapes

# loopjax projection -> the HF submodule that holds it inside each decoder layer.
_MODULE_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
              "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_PEFT_PREFIX = "base_model.model.model.layers.{i}.{module}.{proj}"

# Files a tokenizer folder may hold; copied next to a merged checkpoint so that it is servable
# on its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def _write_json(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _check_lora(model_config: ModelConfig, lora: LoRA, lora_config: LoraConfig) -> int:
    """The rank, after checking the adapter's shapes against the model and the LoRA config."""
    unknown = sorted(set(lora.weights) - set(PROJECTIONS))
    if unknown or not lora.weights:
        raise ValueError(f"lora has projections {unknown or '()'}; expected some of {PROJECTIONS}")
    if set(lora.weights) != set(lora_config.targets):
        raise ValueError(f"lora adapts {sorted(lora.weights)} but lora_config.targets is "
                         f"{sorted(lora_config.targets)}: "
                         "pass the LoraConfig the adapter was made with")
    if not np.isclose(lora.scale, lora_config.scale):
        raise ValueError(f"lora.scale {lora.scale} != lora_config alpha/rank {lora_config.scale}")
    shapes = projection_shapes(model_config)
    L, r = model_config.num_layers, lora_config.rank
    for name, ab in lora.weights.items():
        fan_in, fan_out = shapes[name]
        if tuple(ab["a"].shape) != (L, fan_in, r) or tuple(ab["b"].shape) != (L, r, fan_out):
            raise ValueError(f"lora {name}: a {tuple(ab['a'].shape)}, b {tuple(ab['b'].shape)}; "
                             f"the model and rank {r} need a {(L, fan_in, r)}, b {(L, r, fan_out)}")
    return r


def peft_adapter_tensors(model_config: ModelConfig, lora: LoRA,
                         dtype=None) -> dict[str, np.ndarray]:
    """The adapter as PEFT tensor names -> arrays (lora_A r x in, lora_B out x r per layer)."""
    out = {}
    for name, ab in lora.weights.items():
        a_LxIxR = np.asarray(jax.device_get(ab["a"]))
        b_LxRxO = np.asarray(jax.device_get(ab["b"]))
        if dtype is not None:
            a_LxIxR, b_LxRxO = a_LxIxR.astype(dtype), b_LxRxO.astype(dtype)
        for i in range(model_config.num_layers):
            prefix = _PEFT_PREFIX.format(i=i, module=_MODULE_OF[name], proj=name)
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_LxIxR[i].T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_LxRxO[i].T)
    return out


def export_peft_adapter(out_dir: str, model_config: ModelConfig, lora: LoRA,
                        lora_config: LoraConfig, base_model_path: str | None = None,
                        dtype: str | None = None) -> str:
    """Writes a PEFT LoRA adapter folder; returns out_dir.

    base_model_path goes into adapter_config.json's base_model_name_or_path (what PEFT loads when
    given only the adapter); dtype ("float32", "bfloat16", None = the adapter's own) sets the
    tensors'.
    """
    rank = _check_lora(model_config, lora, lora_config)
    os.makedirs(out_dir, exist_ok=True)
    np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"),
                      peft_adapter_tensors(model_config, lora, np_dtype), metadata={"format": "pt"})
    targets = [p for p in PROJECTIONS if p in lora.weights]  # a stable order
    _write_json(os.path.join(out_dir, "adapter_config.json"), {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": rank,
        "lora_alpha": float(lora_config.alpha),
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    })
    return out_dir


def export_merged(out_dir: str, model_config: ModelConfig, params, lora: LoRA | None = None,
                  tokenizer_dir: str | None = None, dtype: str | None = None) -> str:
    """Writes a Hugging Face checkpoint with the LoRA merged in (config.json + model.safetensors),
    plus the tokenizer files found in tokenizer_dir (if given); returns out_dir."""
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir!r} does not exist")
    merged = params if lora is None else merge_lora(params, lora)
    save_hf_checkpoint(out_dir, model_config, merged, dtype=dtype)
    if tokenizer_dir is not None:
        copied = []
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
                copied.append(name)
        if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise FileNotFoundError(f"{tokenizer_dir!r} has no tokenizer.json, tokenizer.model or "
                                    "vocab.json: pass the folder the tokenizer was loaded from")
    return out_dir
