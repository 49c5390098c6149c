"""The environment loop over the real sampling engine with a scripted environment: records are
consistent, the sampler's log-probs equal the learner's recompute over whole multi-turn
conversations, straggler cuts and environment failures are handled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.envs.base import EvalResult, Observation, StepResult, Supervisor
from loopjax.models.config import ModelConfig
from loopjax.models.tokenizer import train_sentencepiece
from loopjax.models.transformer import init_params, token_logprobs
from loopjax.rollout.collector import EpisodeLimits, collect
from loopjax.sampling.engine import SamplingEngine

SUP = Supervisor("Ada", "Lovelace", "ada@mail.com", "555-0000")


class ScriptedEnv:
    """Replies with a fixed output; done after `turns` steps; tasks named 'broken*' fail."""

    def __init__(self, turns=2):
        self.turns, self.failure = turns, None

    def reset(self, task_id):
        self.task_id, self.n = task_id, 0
        self.failure = "server crashed" if task_id.startswith("broken") else None
        return Observation(task_id, f"Do task {task_id}.", SUP, "2024-05-15", ("phone",), "fake")

    def step(self, code):
        self.n += 1
        return StepResult(f"output {self.n}: 42", self.n >= self.turns)

    def evaluate(self):
        ok = self.task_id.endswith("0")
        return EvalResult(2, ("a",) if ok else (), () if ok else ("a",), 0.5 * (1 + ok), ok)

    def close(self):
        pass


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    corpus = ["Do task alpha. Output 42. apis.phone.send(to='x')", "```python\nprint(1)\n```"] * 50
    tok = train_sentencepiece(corpus, str(tmp_path_factory.mktemp("tok")), vocab_size=320)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    params = init_params(config, jax.random.key(0))
    return tok, config, params


def _collect(policy, tasks, groups, **kw):
    tok, config, params = policy
    engine = SamplingEngine(config, 4, 1024, stop_ids=sorted(tok.eos_ids))
    envs = [ScriptedEnv() for _ in range(4)]
    limits = EpisodeLimits(max_interactions=3, max_new_tokens=12, max_seq_len=1024,
                           max_obs_tokens=32, compact_prompt=True)
    return collect(engine, params, None, envs, tok, tasks, groups, limits, key=jax.random.key(1),
                   workers=2, **kw)


def test_records_and_logprobs_match_the_learner(policy):
    tok, config, params = policy
    tasks = ["t0", "t1", "t2", "t3", "t4", "t5"]
    records, stats = _collect(policy, tasks, [0, 0, 0, 1, 1, 1], overlap=True)
    assert [r["task_id"] for r in records] == tasks and stats["cut"] == 0
    worst = 0.0
    for r in records:
        n = len(r["tokens"])
        assert len(r["is_output"]) == len(r["logp"]) == len(r["turn_id"]) == n <= 1024
        # A random policy rarely writes a code block: its turns get the no-code reply, and the
        # episode ends at the interaction budget (or at complete_task after 2 code turns).
        assert 1 <= r["num_turns"] <= 3
        assert r["end_reason"] in ("complete_task", "max_interactions")
        assert set(np.unique(r["turn_id"][r["is_output"]]).tolist()) == set(range(1, r["num_turns"] + 1))
        assert np.all(r["turn_id"][~r["is_output"]] == 0)
        assert r["reward"] == (1.0 if r["task_id"].endswith("0") else 0.5)
        # The learner's full forward over the whole conversation gives the sampler's log-probs.
        logp = token_logprobs(config, params, jnp.asarray(r["tokens"])[None])[0]
        out = r["is_output"]
        worst = max(worst, float(np.max(np.abs(np.asarray(logp)[out] - r["logp"][out]))))
    assert worst <= 1e-5, worst


def test_same_key_same_rollouts_with_or_without_overlap(policy):
    tasks, groups = ["t0", "t1", "t2", "t3", "t4"], [0, 0, 1, 1, 2]
    a, _ = _collect(policy, tasks, groups, overlap=True)
    b, _ = _collect(policy, tasks, groups, overlap=False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_straggler_cut_and_env_failures(policy):
    tasks = [f"t{i}" for i in range(8)]
    records, stats = _collect(policy, tasks, [i // 4 for i in range(8)], overlap=False,
                              straggler_fraction=0.5, straggler_task_fraction=0.5)
    assert len(records) + stats["cut"] == 8 and len(records) >= 4
    records, _ = _collect(policy, ["broken0", "t1"], [0, 0], overlap=False)
    assert records[0]["env_failure"] == "server crashed" and records[1]["env_failure"] is None
