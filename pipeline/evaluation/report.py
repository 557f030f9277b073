"""The evaluation report: one Markdown and one self-contained HTML page from the same tables, with plots.

Plots (matplotlib, Agg): training and validation loss curves read from each model folder's
``train_metrics.jsonl`` (pretrain: ``{"kind": "train", "loss"}`` / ``{"kind": "eval", "val_loss"}``
records; sft/dpo: the Trainer's ``loss`` / ``eval_loss`` logs), bits per byte per language, and
lm_eval accuracy per task. The HTML embeds the PNGs as data URIs, so it is one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

METRICS_FILE = "train_metrics.jsonl"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, alt text)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """The Wilson score interval (95% by default) of a share ``hits / n``; (None, None) when n is 0. Used beside every
    accuracy in the report: with 32 items a measured 0.5 may be anything from 0.34 to 0.66."""
    if n <= 0:
        return None, None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def share_with_interval(share: float | None, n: int | None) -> str:
    """``0.53 [0.36, 0.69]`` (the 95% Wilson interval), or ``–``."""
    if share is None or not n:
        return "–"
    low, high = wilson(round(share * n), n)
    return f"{share:.3f} [{low:.2f}, {high:.2f}]"


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _md_cell(value: Any) -> str:
    text = fmt(value).replace("\\", "\\\\").replace("|", "\\|")
    return "<br>".join(text.splitlines()) or " "  # every line break str.splitlines knows (\x1c, \u2028, ...)


def to_markdown(title: str, intro: str, sections: list[Section]) -> str:
    out = [f"# {title}", "", intro, ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        if sec.text:
            out += [sec.text, ""]
        for table in sec.tables:
            if table.caption:
                out += [f"**{table.caption}**", ""]
            out.append("| " + " | ".join(_md_cell(h) for h in table.headers) + " |")
            out.append("|" + "|".join("---" for _ in table.headers) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
            out.append("")
        for name, alt in sec.images:
            out += [f"![{alt}]({name})", ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;
text-align:left}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
td pre{white-space:pre-wrap;margin:0;font-family:inherit}img{max-width:100%}caption{font-weight:bold;text-align:left}"""


def to_html(title: str, intro: str, sections: list[Section], folder: str) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{esc(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>", f"<p>{esc(intro)}</p>"]
    for sec in sections:
        out.append(f"<h2>{esc(sec.title)}</h2>")
        if sec.text:
            out.append(f"<p>{esc(sec.text)}</p>")
        for table in sec.tables:
            out.append("<table>" + (f"<caption>{esc(table.caption)}</caption>" if table.caption else ""))
            out.append("<tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in table.headers) + "</tr>")
            for row in table.rows:
                cells = []
                for c in row:
                    if isinstance(c, (int, float)) and not isinstance(c, bool):
                        cells.append(f"<td class=\"num\">{esc(fmt(c))}</td>")
                    else:
                        cells.append(f"<td><pre>{esc(fmt(c))}</pre></td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</table>")
        for name, alt in sec.images:
            with open(os.path.join(folder, name), "rb") as fh:
                data = base64.b64encode(fh.read()).decode("ascii")
            out.append(f"<p><img alt=\"{esc(alt)}\" src=\"data:image/png;base64,{data}\"></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------- plots


def read_curves(model_folder: str, manifest_metrics: dict[str, Any] | None = None) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss)], "val": [(step, loss)]}`` from a model folder's training metrics.

    sft records its held-out loss only before and after training, in the manifest metrics
    (``eval_loss_before`` / ``eval_loss_after``): those become validation points at step 0 and the last step."""
    path = os.path.join(model_folder, METRICS_FILE)
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}
    if not os.path.exists(path):
        return curves
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            step = rec.get("step")
            if not isinstance(step, int):
                continue
            if rec.get("kind") == "train" or (rec.get("kind") is None and isinstance(rec.get("loss"), (int, float))):
                if isinstance(rec.get("loss"), (int, float)):
                    curves["train"].append((step, float(rec["loss"])))
            for key in ("val_loss", "eval_loss"):
                if isinstance(rec.get(key), (int, float)):
                    curves["val"].append((step, float(rec[key])))
    m = manifest_metrics or {}
    if not curves["val"] and isinstance(m.get("eval_loss_after"), (int, float)):
        last = int(m.get("steps") or (curves["train"][-1][0] if curves["train"] else 1))
        if isinstance(m.get("eval_loss_before"), (int, float)):
            curves["val"].append((0, float(m["eval_loss_before"])))
        curves["val"].append((last, float(m["eval_loss_after"])))
    return curves


def _pyplot() -> Any:
    # Agg is chosen here, when a plot is drawn, not at import: importing pyplot picks no backend,
    # and whoever imports this module keeps theirs until then.
    matplotlib.use("Agg", force=True)
    return plt


def _save(fig: Any, folder: str, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    with open(os.path.join(folder, name), "wb") as fh:
        fh.write(buf.getvalue())
    return name


def plot_loss_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], folder: str) -> str | None:
    have = {label: c for label, c in curves.items() if c["train"] or c["val"]}
    if not have:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(have), figsize=(4.6 * len(have), 3.4), squeeze=False)
    for ax, (label, c) in zip(axes[0], have.items()):
        if c["train"]:
            ax.plot(*zip(*c["train"]), label="train loss", color="tab:blue")
        if c["val"]:
            ax.plot(*zip(*c["val"]), "o-", label="validation loss", color="tab:orange")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=.3)
        ax.legend(fontsize="small")
    return _save(fig, folder, "loss_curves.png")


def plot_grouped(values: dict[str, dict[str, float]], folder: str, name: str, title: str, ylabel: str) -> str | None:
    """Bars: one group per x key, one bar per model. ``values[model][x] = y``."""
    xs = sorted({x for per in values.values() for x in per})
    if not xs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(xs) * max(1, len(values)) / 2), 3.4))
    width = 0.8 / max(1, len(values))
    for i, (label, per) in enumerate(values.items()):
        pos = [j + (i - (len(values) - 1) / 2) * width for j in range(len(xs))]
        ax.bar(pos, [per.get(x, float("nan")) for x in xs], width, label=label)
    ax.set_xticks(range(len(xs)), xs, rotation=20 if len(xs) > 4 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=.3)
    ax.legend(fontsize="small")
    return _save(fig, folder, name)
