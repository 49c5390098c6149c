"""KV-cache sampling on the learner's own params: slots, prefill, fused decode, exact log-probs."""

from loopjax.sampling.engine import (
                                     CONTEXT_FULL,
                                     MAX_NEW,
                                     STOP,
                                     Generation,
                                     SamplingEngine,
                                     generate,
)
from loopjax.sampling.sample import sample_tokens

__all__ = ["SamplingEngine", "Generation", "generate", "sample_tokens", "STOP", "MAX_NEW",
           "CONTEXT_FULL"]
