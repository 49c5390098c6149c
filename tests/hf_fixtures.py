"""Tiny random Hugging Face checkpoints, made by transformers (PyTorch, CPU) with no download."""

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=512)

FAMILIES = {
    # Qwen2/Qwen2.5: q/k/v bias, tied embeddings as the small Qwen2.5 models have.
    "qwen2": lambda: transformers.Qwen2Config(**TINY, rope_theta=1e6, tie_word_embeddings=True),
    # Qwen3: q/k RMSNorm, head_dim apart from hidden_size / heads.
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=24, rope_theta=1e6),
    # Llama 3: llama3 rope scaling (short original length so the scaling matters at small
    # positions).
    "llama": lambda: transformers.LlamaConfig(
        **TINY, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)),
}


def make_checkpoint(path, family: str, seed: int = 0, **save_kwargs):
    """Saves a random model of `family` to `path`; returns the torch model (eval mode, fp32)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    # Random norms and biases too, so a mapping mistake in them cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(str(path), **save_kwargs)
    return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()
