"""loopjax: LOOP (leave-one-out PPO) for LLM agents in stateful multi-app API worlds, in JAX."""

__version__ = "0.1.0"
