"""Run-folder outputs: metrics.jsonl + TensorBoard events, progress, Timer, PNG, HTML, console
table."""
import glob
import json
import math
import os
import struct
import time

import numpy as np
import pytest

from loopjax.envs.base import EpisodeRecord, EvalResult, Turn
from loopjax.metrics import MetricsWriter, Timer, progress
from loopjax.report import before_after_table, choose_episodes, learning_curve, trajectories_html
from loopjax.rollout.records import ShownEpisode

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_tb_scalars(events_dir):
    """{tag: [(step, value)]} from TFRecord event files, decoded with tensorboardX's own protos."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(glob.glob(os.path.join(events_dir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, payload, payload crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


# ----------------------------------------------------------------------------- MetricsWriter

def test_metrics_round_trip_nan_and_torn_line(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(0, {"train/reward": 0.25, "train/success": True, "note": "warm start"})
        writer.write(1, {"kl": float("nan"), "big": np.float32(np.inf), "n": np.int64(3)},
                     prefix="update/")
    path = tmp_path / "metrics.jsonl"
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    with open(path, "a") as f:
        f.write('{"step": 2, "train/rew')  # the process died mid-line

    records = MetricsWriter.read(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    assert records[0]["train/reward"] == 0.25 and records[0]["train/success"] is True
    assert records[0]["note"] == "warm start"
    assert records[1]["update/kl"] is None and records[1]["update/big"] is None
    assert records[1]["update/n"] == 3
    assert abs(records[0]["time"] - time.time()) < 600

    # Resuming appends after the last whole line instead of gluing onto the torn one.
    with MetricsWriter(tmp_path) as writer:
        writer.write(2, {"train/reward": 0.5})
    assert [r["step"] for r in MetricsWriter.read(tmp_path)] == [0, 1, 2]


def test_metrics_read_rejects_corruption_in_the_middle(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        MetricsWriter.read(tmp_path)
    assert MetricsWriter.read(tmp_path / "missing") == []


def test_tensorboard_events_hold_the_scalars(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(3, {"train/reward": 0.75, "note": "skipped for TensorBoard", "kl": 0.01})
        writer.write(4, {"train/reward": 1.0})
    files = glob.glob(str(tmp_path / "events" / "events.out.tfevents.*"))
    assert files and all(os.path.getsize(f) > 0 for f in files)
    scalars = read_tb_scalars(tmp_path / "events")
    assert [(s, pytest.approx(v)) for s, v in scalars["train/reward"]] == [(3, 0.75), (4, 1.0)]
    assert scalars["kl"] == [(3, pytest.approx(0.01))]
    assert "note" not in scalars


def test_disabled_writer_writes_nothing(tmp_path):
    with MetricsWriter(tmp_path / "run", enabled=False) as writer:
        writer.write(0, {"x": 1.0})
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- progress, Timer

def test_progress_without_tty_logs_plain_lines(capsys):
    items = list(progress(range(5), desc="rollouts"))
    assert items == list(range(5))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rollouts: 5/5") and err[0].endswith("done")

    with progress(3, desc="update", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_timer_shares():
    timer = Timer()
    timer.totals.update(generate=3.0, update=1.0)  # known totals; no assertions on real wall time
    with timer("eval"):
        pass
    shares = timer.shares()
    total = shares["time/total_s"]
    assert shares["time/generate_share"] == pytest.approx(3.0 / total)
    assert sum(v for k, v in shares.items() if k.endswith("_share")) == pytest.approx(1.0)
    assert shares["time/generate_s"] == 3.0 and "time/eval_s" in shares


# ----------------------------------------------------------------------------- learning_curve

def _assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 400 and height >= 300 and len(data) > 5000


def test_learning_curve_png(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(20):
            writer.write(step, {"train/reward": step / 20, "train/success": (step / 20) ** 2,
                                "update/kl_k3": 0.01 * math.sqrt(step),
                                "update/clip_fraction": 0.1})
            if step % 5 == 0:
                writer.write(step, {"success": step / 25, "reward": step / 22}, prefix="eval/dev/")
                writer.write(step, {"tgc": step / 30, "num_tasks": 12}, prefix="eval/test_normal/")
        writer.write(20, {"train/reward": float("nan")})  # a null must not break the plot
    path = learning_curve(tmp_path)
    assert path == str(tmp_path / "learning_curve.png")
    _assert_png(path)


def test_learning_curve_empty(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    _assert_png(learning_curve(tmp_path, tmp_path / "out" / "curve.png"))


# ----------------------------------------------------------------------------- trajectories_html

def _episode(task_id, tag, success, output="ok"):
    result = EvalResult(2, ("test_paid_bob",), () if success else ("test_<b>note</b>_saved",),
                        1.0 if success else 0.5, success)
    turn = Turn("I will pay.\n```python\nprint(1)\n```", "print(1)", output)
    record = EpisodeRecord(task_id, "Pay Bob $5 & say <hi>", (turn,), "complete_task", result)
    return ShownEpisode(record, "dev", tag, 7)


def test_trajectories_html_escapes_and_lists_everything(tmp_path):
    hostile = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    episodes = [_episode("pay_bob_1", "before LOOP", False, output=hostile),
                _episode("note_alice_2", "after LOOP", True),
                _episode('"quoted"&<task>', "after LOOP", True)]
    path = trajectories_html(episodes, tmp_path / "viewer" / "trajectories.html")
    page = open(path, encoding="utf-8").read()
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert ("pay_bob_1" in page and "note_alice_2" in page
            and "&quot;quoted&quot;&amp;&lt;task&gt;" in page)
    assert '<li class="ok">test_paid_bob</li>' in page
    assert '<li class="bad">test_&lt;b&gt;note&lt;/b&gt;_saved</li>' in page
    assert page.count('<details class="episode"') == 3
    assert "<h2>before LOOP" in page and "<h2>after LOOP" in page
    assert 'href="#ep0"' in page and 'id="ep0"' in page
    assert "http" not in page and "<link" not in page  # self-contained
    assert "reward 0.500 &middot; 1 turns &middot; iteration 7" in page
    # the same task before and after LOOP, side by side
    pair = [_episode("pay_bob_1", "before LOOP", False), _episode("pay_bob_1", "after LOOP", True)]
    page = open(trajectories_html(pair, tmp_path / "pair.html"), encoding="utf-8").read()
    assert "The same tasks before and after LOOP" in page and 'id="pair0"' in page


def test_choose_episodes_keeps_the_pairs_then_evaluations_then_training():
    shown = ([_episode(f"t{i}", "train", True) for i in range(3)]
             + [_episode("d", "during", True), _episode("p", "before LOOP", False),
                _episode("p", "after LOOP", True)])
    assert [(e.tag, e.episode.task_id) for e in choose_episodes(shown, 4)] == [
        ("before LOOP", "p"), ("after LOOP", "p"), ("during", "d"), ("train", "t0")]
    assert [e.tag for e in choose_episodes(shown, 1)] == ["before LOOP", "after LOOP"]


def test_trajectories_html_empty(tmp_path):
    page = open(trajectories_html([], tmp_path / "t.html"), encoding="utf-8").read()
    assert "No episodes." in page


# ----------------------------------------------------------------------------- before_after_table

def test_before_after_table_exact():
    before = {"dev": {"tgc": 0.25, "sgc": 0.1, "reward": 0.4, "num_tasks": 8},
              "test_normal": {"tgc": 0.5, "sgc": 0.3333, "reward": 0.61234, "num_tasks": 12}}
    after = {"dev": {"tgc": 0.625, "sgc": 0.1, "reward": 0.7, "num_tasks": 8},
             "test_normal": {"tgc": 0.4167, "sgc": 0.5, "reward": 0.6, "num_tasks": 12},
             "test_challenge": {"tgc": 0.0, "sgc": 0.0, "reward": 0.05, "num_tasks": 3}}
    assert before_after_table(before, after).splitlines() == [
        "split          | tasks | TGC before | TGC after | delta | SGC before | SGC after | delta"
        " | reward before | reward after",
        "---------------+-------+------------+-----------+-------+------------+-----------+-------"
        "+---------------+-------------",
        "dev            |     8 |      25.0% |     62.5% | +37.5 |      10.0% |     10.0% |  +0.0"
        " |         0.400 |        0.700",
        "test_normal    |    12 |      50.0% |     41.7% |  -8.3 |      33.3% |     50.0% | +16.7"
        " |         0.612 |        0.600",
        "test_challenge |     3 |          - |      0.0% |     - |          - |      0.0% |     -"
        " |             - |        0.050",
    ]
