"""The policy model: a pure-functional Qwen2/Qwen2.5/Qwen3/Llama-3 transformer, its checkpoints,
LoRA and tokenizers.

    from loopjax.models import forward, load_hf_checkpoint, token_logprobs
"""

from loopjax.models.config import ModelConfig
from loopjax.models.hf_io import load_hf_checkpoint
from loopjax.models.tokenizer import load_tokenizer
from loopjax.models.transformer import forward, init_params, token_logprobs

__all__ = ["ModelConfig", "forward", "init_params", "load_hf_checkpoint", "load_tokenizer",
           "token_logprobs"]
