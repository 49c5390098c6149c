"""ModelConfig: the shape and numerics of one decoder-only transformer, read from a HF
config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# model_type in config.json -> family. Families differ only in biases, q/k norms and rope scaling.
SUPPORTED_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama"}
DTYPES = ("float32", "bfloat16", "float64")  # float64 needs JAX x64 mode (numerics checks)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256  # V
    hidden_size: int = 64  # D
    intermediate_size: int = 128  # F, SwiGLU width
    num_layers: int = 2  # L
    num_heads: int = 4  # H, query heads
    num_kv_heads: int = 2  # Hk, key/value heads (grouped-query attention when < H)
    head_dim: int = 16  # Dh; Qwen3 sets it apart from D / H
    rope_theta: float = 10000.0  # RoPE base
    # Llama-3 style scaling as a sorted tuple of (key, value) pairs (hashable), or None.
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2/Qwen2.5: bias on q, k, v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over Dh on q and k before RoPE
    tie_embeddings: bool = False  # unembedding = embedding transposed
    family: str = "qwen2"  # qwen2 | qwen3 | llama, for messages and export only
    dtype: str = "float32"  # params and activations; softmax, norms and logits are always fp32
    remat: bool = False  # rematerialize each layer in the backward pass (saves activation memory)
    # token_logprobs computes log-softmax over V this many tokens at a time
    logits_chunk: int = 1024
    # Attention without a KV cache (the learner's forward) runs this many queries at a time against
    # the keys up to the block's end: scores never exceed [chunk, T], blocks above the causal
    # diagonal are skipped, and each block is recomputed in the backward pass. 0 = one T x T block.
    # 256 is the fastest on the 2-core CPU at T = 2048 (docs/performance.md).
    attention_chunk: int = 256

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} must be one of {DTYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                  "num_kv_heads", "head_dim", "logits_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.attention_chunk < 0:
            raise ValueError(f"attention_chunk must be >= 0 (0 = unchunked), got "
                             f"{self.attention_chunk}")

    @property
    def jnp_dtype(self):
        import jax.numpy as jnp
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        D, F, H, Hk, Dh, V, L = (self.hidden_size, self.intermediate_size, self.num_heads,
                                 self.num_kv_heads, self.head_dim, self.vocab_size, self.num_layers)
        attn = D * H * Dh * 2 + D * Hk * Dh * 2 + (H + 2 * Hk) * Dh * self.qkv_bias
        layer = attn + 3 * D * F + 2 * D + 2 * Dh * self.qk_norm
        return L * layer + V * D * (1 if self.tie_embeddings else 2) + D

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
        """Maps a transformers config.json dict to a ModelConfig; raises on anything unsupported."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                    f"unsupported architecture model_type={model_type!r} (architectures="
                    f"{hf.get('architectures')}); loopjax supports {sorted(SUPPORTED_MODEL_TYPES)}")
        family = SUPPORTED_MODEL_TYPES[model_type]
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported; set it false in "
                             "config.json")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        if family != "qwen2" and hf.get("attention_bias"):
            raise ValueError("attention_bias=true is supported only for the qwen2 family")
        rope_scaling = hf.get("rope_scaling") or None
        rope_parameters = hf.get("rope_parameters")  # transformers >= 5 writes rope settings here
        rope_theta = hf.get("rope_theta")
        if isinstance(rope_parameters, dict):
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
            if rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = rope_parameters
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind == "default":
                rope_scaling = None
            elif kind != "llama3":
                raise ValueError(f"rope scaling type {kind!r} is not supported (only 'llama3')")
            else:
                keys = ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")
                missing = [k for k in keys if k not in rope_scaling]
                if missing:
                    raise ValueError(f"llama3 rope_scaling lacks {missing}")
                rope_scaling = tuple(sorted((k, float(rope_scaling[k])) for k in keys))
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        fields = dict(
                vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                head_dim=head_dim,
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=rope_scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                qkv_bias=(family == "qwen2") or bool(hf.get("attention_bias")),
                qk_norm=(family == "qwen3"),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), family=family)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_folder(cls, path: str, **overrides) -> ModelConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in {path!r}: "
                                    "expected a Hugging Face model folder")
        with open(cfg_path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(hf, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a Hugging Face loader needs for this model (used by export)."""
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "llama": "LlamaForCausalLM"}
        out = dict(
                architectures=[arch[self.family]], model_type=self.family,
                vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                head_dim=self.head_dim, rope_theta=self.rope_theta,
                rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_embeddings,
                hidden_act="silu", torch_dtype=self.dtype, max_position_embeddings=32768)
        if self.family == "llama":
            out["attention_bias"] = self.qkv_bias
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling, rope_type="llama3")
        return out
