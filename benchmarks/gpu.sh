#!/usr/bin/env bash
# The GPU figures of issue 18 in one go (about 10 minutes on an H100/H200): prints two JSON lines.
#
#   bash benchmarks/gpu.sh            # on a machine with one NVIDIA GPU, JAX[cuda], torch (cuda),
#                                     # transformers and peft installed
#   bash benchmarks/gpu.sh --smoke    # tiny shapes, any machine: checks the plumbing only
#
# 1. The LOOP update step on Qwen2.5-0.5B's shapes (random weights), bf16, LoRA r16, 4 rollouts of
#    T = 2048, loopjax against transformers + peft on the same GPU: tokens/s and model FLOPs as a
#    fraction of the bf16 matmul rate each side measures (the MFU; goal >= 0.40).
# 2. Decode tokens/s at 32 and 64 sequences, the same shapes in bf16, against transformers
#    `generate` on the same GPU, with the bandwidth and compute bounds.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--smoke" ]]; then
  python benchmarks/update_step.py --small --rollouts 2 --repeats 1 --seq 128
  python benchmarks/sampler.py --quick --concurrency 2,4
  exit 0
fi
python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()" \
  || { echo "gpu.sh: JAX sees no GPU (pip install -U 'jax[cuda12]')" >&2; exit 1; }
python -c "import torch; assert torch.cuda.is_available()" \
  || { echo "gpu.sh: torch sees no GPU" >&2; exit 1; }
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # sampler.py holds JAX and torch in one process
timeout 420 python benchmarks/update_step.py --model qwen2-0.5b --dtype bfloat16 --rollouts 4 \
  --steps 3 --repeats 1
timeout 300 python benchmarks/sampler.py --model qwen2-0.5b --dtype bfloat16 --concurrency 32,64 \
  --prompt-len 128 --new-tokens 128
