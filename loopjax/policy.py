"""The policy a run trains: a Hugging Face checkpoint, or a tokenizer and a small model from
scratch.

From scratch (no --model): a SentencePiece tokenizer is trained on the world's own text (prompts,
ground-truth solutions and the environment's replies to them) and a small Qwen-style model is
initialized at random; both are saved in the run folder, so a resumed run reuses them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax

from loopjax import warmstart
from loopjax.envs import make_env
from loopjax.models.config import ModelConfig
from loopjax.models.hf_io import load_hf_checkpoint
from loopjax.models.tokenizer import load_tokenizer, train_sentencepiece
from loopjax.models.transformer import init_params

log = logging.getLogger(__name__)


def build_policy(config, demo, train_tasks):
    """(tokenizer, ModelConfig, params) for `config` (a TrainConfig); a from-scratch tokenizer
    trains on the episodes of `demo` (warmstart.scripted_agents) on `train_tasks`."""
    if config.model:
        model_config, params = load_hf_checkpoint(config.model, dtype=config.dtype)
        tokenizer = load_tokenizer(config.model)
        return tokenizer, model_config, params
    tok_dir = os.path.join(config.run_dir, "tokenizer")
    cfg_path = os.path.join(config.run_dir, "model_config.json")
    if os.path.exists(cfg_path) and config.resume:
        tokenizer = load_tokenizer(tok_dir)
        with open(cfg_path) as f:
            fields = json.load(f)
        model_config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in fields.items()})
    else:
        env = make_env(config.env)
        try:
            corpus = warmstart.transcripts(env, train_tasks, demo,
                                           compact=config.compact_prompt)
        finally:
            env.close()
        tokenizer = train_sentencepiece(corpus, tok_dir, vocab_size=config.scratch.vocab_size)
        s = config.scratch
        model_config = ModelConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=s.hidden_size,
            intermediate_size=s.intermediate_size, num_layers=s.num_layers, num_heads=s.num_heads,
            num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, tie_embeddings=True,
            logits_chunk=256)
        with open(cfg_path, "w") as f:
            json.dump(dataclasses.asdict(model_config), f, indent=2)
        log.info("from-scratch policy: %d params, vocab %d", model_config.num_params(),
                 tokenizer.vocab_size)
    # Random init from the run's seed: a resumed run rebuilds the same params (then restores the
    # trained ones from its checkpoint).
    params = init_params(model_config, jax.random.fold_in(jax.random.key(config.seed), 11))
    return tokenizer, model_config, params
