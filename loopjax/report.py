"""Human-readable outputs of a run: learning-curve PNG, trajectory viewer HTML, before/after table.

The curves read metrics.jsonl, so they work on a finished, crashed or still-running run alike;
the viewer reads typed episodes (loopjax.rollout.records.ShownEpisode). Nothing here imports JAX.
"""
from __future__ import annotations

import html
import os
import re
from collections import defaultdict
from typing import TYPE_CHECKING

from loopjax.metrics import MetricsWriter

if TYPE_CHECKING:  # loopjax.rollout imports JAX; the viewer only reads the records' fields
    from loopjax.rollout.records import ShownEpisode

# Held-out points: eval/<split>/success, or eval/<split>/tgc (task goal completion, the same thing
# under the paper's name, which is what loopjax.eval writes), and eval/<split>/reward.
_EVAL_KEY = re.compile(r"^eval/(?P<split>[^/]+)/(?P<name>success|tgc|reward)$")


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key, skipping records without it and nulls (NaN written as null)."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and "step" in record:  # bools count: success as 0/1
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def learning_curve(run_dir: str | os.PathLike, out_path: str | os.PathLike | None = None) -> str:
    """Draws run_dir/learning_curve.png from metrics.jsonl; returns the path written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on TPU hosts and CI
    import matplotlib.pyplot as plt

    run_dir = os.fspath(run_dir)
    out_path = (os.fspath(out_path) if out_path is not None
                else os.path.join(run_dir, "learning_curve.png"))
    records = MetricsWriter.read(run_dir)
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 10), sharex=True,
                                              height_ratios=[3, 2, 2])
    try:
        drawn_top = _draw_top(top, records)
        drawn_middle = _draw_behaviour(middle, records)
        drawn_bottom = _draw_bottom(bottom, records)
        if not (drawn_top or drawn_middle or drawn_bottom):
            top.text(0.5, 0.5, "no metrics yet", ha="center", va="center", fontsize=16,
                     transform=top.transAxes)
        bottom.set_xlabel("iteration")
        fig.suptitle(f"loopjax: {os.path.basename(os.path.abspath(run_dir))}")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        fig.savefig(out_path, dpi=100)
    finally:
        plt.close(fig)
    return out_path


def _finish(ax, ylabel: str, drawn: bool, legend_size: int) -> bool:
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize=legend_size)
    return drawn


def _draw_top(ax, records: list[dict]) -> bool:
    drawn = False
    for key, label, color in (("train/reward", "train reward", "tab:blue"),
                              ("train/success", "train success", "tab:green")):
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, color=color, label=label, linewidth=1.5)
            drawn = True
    eval_keys = sorted({key for record in records for key in record if _EVAL_KEY.match(key)})
    splits = sorted({_EVAL_KEY.match(key)["split"] for key in eval_keys})
    colors = dict(zip(splits, ["tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:pink",
                               "tab:olive", "tab:cyan", "tab:gray"] * 4, strict=False))
    for key in eval_keys:
        match = _EVAL_KEY.match(key)
        steps, values = _series(records, key)
        if steps:
            marker, line = ("s", ":") if match["name"] == "reward" else ("o", "--")
            ax.plot(steps, values, marker=marker, linestyle=line, color=colors[match["split"]],
                    label=f"eval {match['split']} {match['name']}", markersize=6)
            drawn = True
    return _finish(ax, "reward / success rate", drawn, 8)


# The paper's behaviour measures (loopjax.eval.behaviour), on training rollouts and held-out evals.
_BEHAVIOUR = (("doc_lookups", "API-doc lookups / episode"),
              ("paginate_when_needed", "paginates when needed"),
              ("answered_without_lookup", "answers without a lookup"),
              ("docs_before_call", "reads an API's doc before calling it"),
              ("logins_right", "logs in before use"),
              ("recovered", "recovers after an error"),
              ("code_error_rate", "code-error rate (turns)"))


def _draw_behaviour(ax, records: list[dict]) -> bool:
    drawn = False
    colors = ["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown",
              "tab:gray"]
    for (name, label), color in zip(_BEHAVIOUR, colors, strict=False):
        for key, style in ((f"train/{name}", "-"), (f"eval/dev/{name}", "--")):
            steps, values = _series(records, key)
            if steps:
                where = "train" if key.startswith("train") else "eval dev"
                ax.plot(steps, values, linestyle=style, color=color, label=f"{label} ({where})",
                        marker="o" if style == "--" else None, markersize=4)
                drawn = True
    return _finish(ax, "behaviour", drawn, 7)


def _draw_bottom(ax, records: list[dict]) -> bool:
    drawn = False
    kl_key = next((k for k in ("update/kl_k3", "update/kl_k1") if _series(records, k)[0]), None)
    if kl_key is not None:
        steps, values = _series(records, kl_key)
        ax.plot(steps, values, color="tab:blue", label=kl_key.split("/")[-1].replace("_", " "))
        ax.set_ylabel("KL")
        drawn = True
    steps, values = _series(records, "update/clip_fraction")
    if steps:
        # Clip fraction lives in [0, 1] while KL is often 1e-3: give it its own axis.
        twin = ax.twinx() if drawn else ax
        twin.plot(steps, values, color="tab:orange", label="clip fraction")
        twin.set_ylabel("clip fraction")
        if twin is not ax:
            lines = ax.get_lines() + twin.get_lines()
            ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
        drawn = True
    elif drawn:
        ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return drawn


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
table.summary { border-collapse: collapse; margin-bottom: 2em; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 0.25em 0.6em; \
text-align: left; }
table.summary th { background: #f3f3f3; }
details.episode { border: 1px solid #ccc; border-radius: 4px; margin: 0.6em 0; \
padding: 0.4em 0.8em; }
details.episode > summary { cursor: pointer; font-weight: 600; }
.ok { color: #17702a; } .bad { color: #b3261e; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; \
word-break: break-word; }
pre.output { background: #fffbe6; }
.turn { border-left: 3px solid #9ab; padding-left: 0.8em; margin: 1em 0; }
.label { font-size: 0.85em; color: #555; text-transform: uppercase; letter-spacing: 0.05em; }
ul.tests li.ok::marker { content: "\\2714  "; } ul.tests li.bad::marker { content: "\\2718  "; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _success_cell(success) -> str:
    return '<span class="ok">yes</span>' if success else '<span class="bad">no</span>'


def choose_episodes(episodes: list[ShownEpisode], max_episodes: int) -> list[ShownEpisode]:
    """What the page shows: every held-out episode kept before and after LOOP (the pairs), then
    other evaluations, then training rollouts, up to `max_episodes` (the pairs always)."""
    paired = [e for e in episodes if e.tag in ("before LOOP", "after LOOP")]
    chosen = paired + [e for e in episodes if e.tag not in ("train", "before LOOP", "after LOOP")]
    chosen = chosen[:max(max_episodes, len(paired))]
    return chosen + [e for e in episodes if e.tag == "train"][:max(0, max_episodes - len(chosen))]


def trajectories_html(episodes: list[ShownEpisode], out_path: str | os.PathLike,
                      title: str = "loopjax trajectories") -> str:
    """Writes one static, self-contained page to read episodes, grouped by tag; returns its path.

    All text from episodes is escaped: agent output and environment replies are untrusted.
    """
    by_tag: dict[str, list[tuple[int, ShownEpisode]]] = defaultdict(list)
    for index, shown in enumerate(episodes):
        by_tag[shown.tag].append((index, shown))

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>"]
    if not episodes:
        parts.append("<p>No episodes.</p>")
    parts.append('<table class="summary"><thead><tr><th>#</th><th>tag</th><th>split</th>'
                 "<th>task</th><th>iteration</th><th>reward</th><th>success</th><th>turns</th>"
                 "</tr></thead><tbody>")
    for tag, items in by_tag.items():
        for index, shown in items:
            ep = shown.episode
            parts.append(
                f'<tr><td><a href="#ep{index}">{index}</a></td><td>{_e(tag)}</td>'
                f"<td>{_e(shown.split)}</td>"
                f'<td><a href="#ep{index}">{_e(ep.task_id)}</a></td>'
                f"<td>{_e(shown.iteration)}</td>"
                f"<td>{_format_reward(ep.result.reward)}</td>"
                f"<td>{_success_cell(ep.result.success)}</td>"
                f"<td>{_e(ep.num_turns)}</td></tr>")
    parts.append("</tbody></table>")
    parts.extend(_before_after_html(episodes))
    for section, (tag, items) in enumerate(by_tag.items()):
        successes = sum(bool(shown.episode.result.success) for _, shown in items)
        parts.append(f'<section id="tag{section}"><h2>{_e(tag)} '
                     f"<small>({successes}/{len(items)} succeeded)</small></h2>")
        parts.extend(_episode_html(index, shown) for index, shown in items)
        parts.append("</section>")
    parts.append("</body></html>")

    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return out_path


def _before_after_html(episodes: list[ShownEpisode]) -> list[str]:
    """The same held-out tasks before and after LOOP, side by side."""
    by_task: dict[tuple, dict] = defaultdict(dict)
    for index, shown in enumerate(episodes):
        if shown.tag in ("before LOOP", "after LOOP"):
            by_task[(shown.split, shown.episode.task_id)][shown.tag] = (index, shown)
    pairs = [(k, v) for k, v in by_task.items() if len(v) == 2]
    if not pairs:
        return []
    out = ["<h2>The same tasks before and after LOOP</h2>",
           '<table class="summary"><thead><tr><th>before LOOP</th><th>after LOOP</th></tr></thead>'
           "<tbody>"]
    for _, v in pairs:
        out.append("<tr>" + "".join(f'<td style="vertical-align: top; width: 50%">'
                                     f"{_episode_html(*v[tag], open_=True, anchor='pair')}</td>"
                                     for tag in ("before LOOP", "after LOOP")) + "</tr>")
    out.append("</tbody></table>")
    return out


def _format_reward(reward: float) -> str:
    return f"{float(reward):.3f}"


def _episode_html(index: int, shown: ShownEpisode, open_: bool = False, anchor: str = "ep") -> str:
    ep = shown.episode
    success = ep.result.success
    status = "ok" if success else "bad"
    head = (f'<span class="{status}">{"&#10004;" if success else "&#10008;"}</span> '
            f"{_e(ep.task_id)} &middot; {_e(shown.split)} &middot; "
            f"reward {_format_reward(ep.result.reward)} &middot; "
            f"{_e(ep.num_turns)} turns &middot; iteration {_e(shown.iteration)}")
    out = [f'<details class="episode" id="{anchor}{index}"{" open" if open_ else ""}>'
           f"<summary>{head}</summary>",
           '<p class="label">instruction</p>', f"<pre>{_e(ep.instruction)}</pre>"]
    for number, turn in enumerate(ep.turns, start=1):
        out.append(f'<div class="turn"><h4>turn {number}</h4>')
        out.append(f'<p class="label">assistant</p><pre>{_e(turn.assistant)}</pre>')
        if turn.code:
            out.append(f'<p class="label">executed code</p><pre>{_e(turn.code)}</pre>')
        out.append(f'<p class="label">output</p><pre class="output">{_e(turn.output)}</pre>')
        out.append("</div>")
    passes, failures = ep.result.passes, ep.result.failures
    out.append(f'<p class="label">unit tests: {len(passes)} passed, {len(failures)} failed</p>'
               '<ul class="tests">')
    out.extend(f'<li class="ok">{_e(test)}</li>' for test in passes)
    out.extend(f'<li class="bad">{_e(test)}</li>' for test in failures)
    out.append("</ul></details>")
    return "\n".join(out)


def before_after_table(before: dict[str, dict], after: dict[str, dict]) -> str:
    """Console table, one row per split: TGC / SGC / mean reward before and after LOOP.

    Inputs per split: {"tgc": [0, 1], "sgc": [0, 1], "reward": float, "num_tasks": int}.
    TGC and SGC print as percentages with one decimal, deltas in percentage points; rewards with 3.
    A split missing from one side shows "-".
    """
    header = ["split", "tasks", "TGC before", "TGC after", "delta", "SGC before", "SGC after",
              "delta", "reward before", "reward after"]
    splits = list(before) + [split for split in after if split not in before]
    rows = []
    for split in splits:
        b, a = before.get(split, {}), after.get(split, {})
        num = a.get("num_tasks", b.get("num_tasks"))
        rows.append([split, "-" if num is None else str(num),
                     _pct(b.get("tgc")), _pct(a.get("tgc")), _delta(b.get("tgc"), a.get("tgc")),
                     _pct(b.get("sgc")), _pct(a.get("sgc")), _delta(b.get("sgc"), a.get("sgc")),
                     _num(b.get("reward")), _num(a.get("reward"))])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(cells):
        return " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                          for i, (cell, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _delta(before, after) -> str:
    if before is None or after is None:
        return "-"
    return f"{round(100 * (after - before), 1) + 0.0:+.1f}"  # + 0.0: never print "-0.0"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"
