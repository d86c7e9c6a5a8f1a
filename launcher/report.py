"""``ktrain report``: one or several runs' curves per epoch, side by side, as a PNG and as a
small HTML page (the picture and the same numbers as tables).

Read from each run's metrics.csv: one panel per metric (training solid, validation dashed,
one colour per run) and one for throughput (samples/s per epoch); under it, where a run's
group changed size or restarted, its world size over the epochs (summary.json's
``world_size_history``). The chief writes a
report of its own run into output_dir at the end of every run (``report: false`` turns it
off); matplotlib draws it, off-screen.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import tempfile

from ktrain.errors import UserError
from ktrain.output import RunOutput

TIMING = ("epoch_seconds", "samples_per_second")
"""metrics.csv's columns that time an epoch rather than measure the model."""


def write_report(run_dirs: list[str], png: str | None = None) -> str:
    """Draw the runs in ``run_dirs``; write ``png`` and the HTML page beside it (default:
    report.png in the one run's folder). Returns where the PNG went."""
    runs = [RunOutput.named(d) for d in run_dirs]
    histories = {_label(out, runs): _history(out) for out in runs}
    sizes = {_label(out, runs): _sizes(out, histories[_label(out, runs)]) for out in runs}
    picture = _draw(histories, {label: s for label, s in sizes.items() if len(s) > 2})
    page = _page(histories, picture)
    if png is None and len(runs) == 1:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "report.png")
            _write(local, picture, page)
            runs[0].publish(os.path.join(tmp, "report.html"), "report.html")
            return runs[0].publish(local, "report.png")
    png = png or "report.png"
    _write(png, picture, page)
    return png


def _write(png: str, picture: bytes, page: str) -> None:
    with open(png, "wb") as f:
        f.write(picture)
    with open(os.path.splitext(png)[0] + ".html", "w") as f:
        f.write(page)


def _label(out, runs) -> str:
    """A run's folder name, or its whole path where two runs share a folder name."""
    name = os.path.basename(out.path)
    return out.url if sum(os.path.basename(r.path) == name for r in runs) > 1 else name


def _history(out) -> list[dict[str, float]]:
    target = f"{out.path}/metrics.csv"
    if not out.fs.exists(target):
        raise UserError(f"'{out.url}' has no metrics.csv", where="ktrain report",
                        hint="give the output_dir of a run that trained at least one epoch")
    with out.fs.open(target, "r") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def _sizes(out, history: list[dict]) -> list[tuple[float, int]]:
    """(epochs done, workers) where each of a run's groups started, and where the run ended."""
    groups = out.read_summary().get("world_size_history", [])
    points = [(g["epoch"], g["size"]) for g in groups if "epoch" in g]
    if points and history:
        points.append((history[-1]["epoch"], points[-1][1]))
    return points


def _panels(histories: dict[str, list[dict]]) -> list[str]:
    """One panel per metric (its validation twin drawn in it), throughput last."""
    columns = dict.fromkeys(k for rows in histories.values() for row in rows for k in row)
    metrics = sorted((k for k in columns if k != "epoch" and k not in TIMING
                      and not k.startswith("val_")), key=lambda k: k != "loss")
    metrics += [k[4:] for k in columns if k.startswith("val_") and k[4:] not in metrics]
    return metrics + (["samples_per_second"] if "samples_per_second" in columns else [])


def _draw(histories: dict[str, list[dict]], sizes: dict[str, list[tuple]]) -> bytes:
    import matplotlib  # loaded only to draw: every `ktrain run` imports this module

    matplotlib.use("Agg")  # no screen needed
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = _panels(histories) + (["world size"] if sizes else [])
    cols = min(3, len(panels)) or 1
    rows = -(-len(panels) // cols) or 1
    figure = Figure(figsize=(4.8 * cols, 3.4 * rows), dpi=100, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    colours = matplotlib.colormaps["tab10"].colors
    for ax, metric in zip(axes, panels):
        if metric == "world size":
            for colour, label in zip(colours * 10, histories):
                if label in sizes:
                    ax.step(*zip(*sizes[label]), where="post", color=colour, label=label)
            ax.set_title("world size (workers)")
            ax.set_xlabel("epoch")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            continue
        for colour, (label, history) in zip(colours * 10, histories.items()):
            for key, style, suffix in ((metric, "-", ""), (f"val_{metric}", "--", " (val)")):
                points = [(r["epoch"], r[key]) for r in history if key in r]
                if points and not (metric == "samples_per_second" and suffix):
                    ax.plot(*zip(*points), style, color=colour, marker=".",
                            label=f"{label}{suffix}")
        ax.set_title("throughput (samples/s)" if metric == "samples_per_second" else metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _page(histories: dict[str, list[dict]], picture: bytes) -> str:
    tables = []
    for label, history in histories.items():
        columns = list(dict.fromkeys(k for row in history for k in row))
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(
            f"<td>{_number(row.get(c))}</td>" for c in columns) + "</tr>" for row in history)
        tables.append(f"<h2>{html.escape(label)}</h2>\n<table><tr>{head}</tr>{body}</table>")
    image = base64.b64encode(picture).decode()
    return ("<!doctype html>\n<meta charset=utf-8>\n<title>ktrain report</title>\n"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style>\n"
            f"<h1>ktrain report</h1>\n<img alt='curves per epoch' "
            f"src='data:image/png;base64,{image}'>\n" + "\n".join(tables) + "\n")


def _number(value) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"
