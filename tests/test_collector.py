"""The environment loop over the real sampling engine with a scripted environment: records are
consistent, the sampler's log-probs (with a LoRA adapter) equal the update step's own learner path
over whole multi-turn conversations, straggler cuts and environment failures are handled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.envs.base import EvalResult, Observation, StepResult, Supervisor
from loopjax.loop.update import rollout_logprobs
from loopjax.models.config import ModelConfig
from loopjax.models.lora import LoraConfig, init_lora
from loopjax.models.tokenizer import train_sentencepiece
from loopjax.models.transformer import init_params, token_logprobs
from loopjax.rollout.batch import pack_minibatch
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
    params["unembed"] = params["unembed"] * 10.0  # far from uniform: log-probs of all sizes
    # A LoRA adapter with a non-zero B (init_lora's is 0), so that it changes the log-probs.
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                        init_lora(config, LoraConfig(), jax.random.key(2)))
    return tok, config, params, lora


def _collect(policy, tasks, groups, engine=None, lora=None, **kw):
    tok, config, params, policy_lora = policy
    lora = policy_lora if lora is None else lora
    engine = engine or SamplingEngine(config, 4, 1024, stop_ids=sorted(tok.eos_ids))
    envs = [ScriptedEnv() for _ in range(4)]
    limits = EpisodeLimits(max_interactions=3, max_new_tokens=12, max_seq_len=1024,
                           max_obs_tokens=32, compact_prompt=True)
    return collect(engine, params, lora, envs, tok, tasks, groups, limits, key=jax.random.key(1),
                   workers=2, **kw)


def test_records_and_logprobs_match_the_learner(policy):
    tok, config, params, lora = policy
    tasks = ["t0", "t1", "t2", "t3", "t4", "t5"]
    records, summary = _collect(policy, tasks, [0, 0, 0, 1, 1, 1], overlap=True)
    assert [r.task_id for r in records] == tasks and summary.cut == 0
    for r in records:
        n = len(r.tokens)
        assert len(r.is_output) == len(r.logp) == len(r.turn_id) == n <= 1024
        # A random policy rarely writes a code block: its turns get the no-code reply, and the
        # episode ends at the interaction budget (or at complete_task after 2 code turns).
        ep = r.episode
        assert 1 <= ep.num_turns <= 3 and ep.task_id == r.task_id
        assert ep.end_reason in ("complete_task", "max_interactions")
        assert ep.result.reward == r.reward and ep.instruction == f"Do task {r.task_id}."
        assert set(np.unique(r.turn_id[r.is_output]).tolist()) == set(range(1, ep.num_turns + 1))
        assert np.all(r.turn_id[~r.is_output] == 0)
        assert r.reward == (1.0 if r.task_id.endswith("0") else 0.5)
    assert max(r.episode.num_turns for r in records) > 1

    # The learner as the update step runs it: conversations packed two or more to a forward row,
    # split into 2 microbatches, attention in blocks of 32 queries, log-softmax 32 tokens at a time.
    learner_config = config.replace(attention_chunk=32, logits_chunk=32)
    longest = max(len(r.tokens) for r in records)
    length = -(-2 * longest // 32) * 32
    assert length > 2 * 32  # several attention blocks per row
    batch = pack_minibatch(records, np.ones(len(records), np.float32), 8, length, pack=True,
                           microbatches=2)
    assert 2 * batch.tokens_UxRxT.shape[1] < len(records)

    @jax.jit
    def learner(lora, batch):
        return jax.lax.map(lambda mb: rollout_logprobs(learner_config, lora, params, mb), batch)

    logp_2xBxT = np.asarray(learner(lora, batch))
    worst = 0.0
    for b, r in enumerate(records):  # slot b is row b // 2 of microbatch b % 2
        out = r.is_output
        logp = logp_2xBxT[b % 2, b // 2, :len(out)]
        worst = max(worst, float(np.max(np.abs(logp[out] - r.logp[out]))))
    # fp32: measured 1.4e-6 on the 2-core CPU (KV-cache decode vs packed blocked forward).
    print(f"max |sampler - learner| logp: {worst:.2e}")
    assert worst <= 1e-5, worst


def test_prefix_cache_holds_one_collection_only(policy):
    """One engine, two collections of the same tasks with different adapters (the params of two
    iterations): the second maps no prompt page the first computed, and its log-probs are its own
    adapter's; within a collection the tasks' common prompt pages are shared."""
    tok, config, params, lora = policy
    engine = SamplingEngine(config, 4, 1024, stop_ids=sorted(tok.eos_ids), page_size=16)
    tasks, groups = ["t0", "t0", "t1", "t1"], [0, 0, 1, 1]
    _, first = _collect(policy, tasks, groups, engine=engine, overlap=False)
    other = jax.tree.map(lambda x: -x, lora)
    records, second = _collect(policy, tasks, groups, engine=engine, lora=other, overlap=False)
    assert first.prefill_shared_tokens == second.prefill_shared_tokens > 0
    assert first.prefill_tokens == second.prefill_tokens
    for r in records:
        ref = np.asarray(token_logprobs(config, params, jnp.asarray(r.tokens[None]), lora=other))[0]
        assert np.abs(ref[r.is_output] - r.logp[r.is_output]).max() <= 1e-5


def test_same_key_same_rollouts_with_or_without_overlap(policy):
    tasks, groups = ["t0", "t1", "t2", "t3", "t4"], [0, 0, 1, 1, 2]
    a, _ = _collect(policy, tasks, groups, overlap=True)
    b, _ = _collect(policy, tasks, groups, overlap=False)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)


def test_straggler_cut_and_env_failures(policy):
    tasks = [f"t{i}" for i in range(8)]
    records, summary = _collect(policy, tasks, [i // 4 for i in range(8)], overlap=False,
                                straggler_fraction=0.5, straggler_task_fraction=0.5)
    assert len(records) + summary.cut == 8 and len(records) >= 4
    records, _ = _collect(policy, ["broken0", "t1"], [0, 0], overlap=False)
    assert records[0].episode.env_failure == "server crashed"
    assert records[1].episode.env_failure is None
