"""episodes.jsonl read back: each line gives the EpisodeRecord it was written from, and a file's
phases give the behaviour measures of loopjax.eval over those records."""

import dataclasses

from conftest import as_rollout
from loopjax import episodes
from loopjax.envs.base import EpisodeRecord, EvalResult, Turn
from loopjax.eval import behaviour

WORLD = "miniworld-tiny"


def _rollout(task, turns, passes, failures, group):
    result = EvalResult(len(passes) + len(failures), passes, failures,
                        len(passes) / (len(passes) + len(failures)), not failures)
    record = EpisodeRecord(task, f"do {task}", turns, "complete_task", result, None)
    return dataclasses.replace(as_rollout([1, 2], [False, True], [0.0, -0.5], [0, 0],
                                          reward=result.reward, group=group, task_id=task),
                               episode=record)


def test_lines_give_back_their_records_and_measures(tmp_path):
    rollouts = [
        _rollout("balance_question.dev.0", (Turn("I look", "print(apis.api_docs.show_api_doc("
                                    "'payments', 'show_balance'))", "{...}"),
                               Turn("now", "b = apis.payments.show_balance()\n1 / 0",
                                    "Traceback: ZeroDivisionError"),
                               Turn("again", "apis.supervisor.complete_task(answer=3)", "ok")),
                 ("answer",), (), 0),
        _rollout("contact_phone.dev.1", (Turn("go", "apis.supervisor.complete_task()", "done"),),
                 ("nothing else changed",), ("the answer is right",), 1)]
    path = tmp_path / episodes.FILE
    episodes.write(path, rollouts, WORLD, split="dev", tag="before LOOP", iteration=0)
    episodes.write(path, rollouts[1:], WORLD, split="train", tag="train", iteration=1)
    lines = episodes.read(path)
    assert [episodes.record(x) for x in lines] == [r.episode for r in rollouts + rollouts[1:]]
    first, second = episodes.phases(path, WORLD)
    assert (first["tag"], first["iteration"], first["split"], first["episodes"]) == (
        "before LOOP", 0, "dev", 2)
    assert first["tgc"] == 0.5 and first["reward"] == 0.75
    assert {k: first[k] for k in behaviour(rollouts, WORLD)} == behaviour(rollouts, WORLD)
    assert second["episodes"] == 1 and second["tgc"] == 0.0
