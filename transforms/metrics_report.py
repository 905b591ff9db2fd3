"""Online metrics reports: window rows to CSV and PNG, a run's totals to JSON.

>>> import os, tempfile
>>> from transforms.metrics_math import OnlineMetricsAccumulator
>>> acc = OnlineMetricsAccumulator(window_s=60)
>>> acc.add(scores=[0.1, 0.4, 0.35, 0.8], labels=[0, 0, 1, 1], weights=None,
...         ts_ms=[1_000, 2_000, 61_000, 62_000])
>>> rows = acc.flush()
>>> folder = tempfile.TemporaryDirectory()
>>> write_report(rows, acc.totals(), os.path.join(folder.name, "online"))
>>> sorted(os.listdir(folder.name))
['online-totals.json', 'online.csv', 'online.png']
>>> [r["examples"] for r in read_csv(os.path.join(folder.name, "online.csv"))]
[2, 2]
>>> folder.cleanup()
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from schemas import strict_json
from transforms.metrics_math import COLUMNS


def write_csv(rows, path: str) -> None:
    """Writes window rows to a CSV file, one line per window.

    Args:
        rows: dicts with ``transforms.metrics_math.COLUMNS`` (other keys are left out).
        path: the file (its folder is made if missing).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list:
    """Reads a CSV file :func:`write_csv` wrote.

    Args:
        path: the file.

    Returns:
        its rows, dicts with numbers as int (times, counts) or float.
    """
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (int(v) if k in ("window_start_ms", "window_end_ms", "examples",
                                     "positives") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def fixed_margins(fig, left: float, right: float, top: float, bottom: float,
                  hspace: float = 0.0, wspace: float = 0.0) -> None:
    """Lays out ``fig``'s grid of subplots with fixed margins and gaps, in inches.

    The project's plots use this instead of ``tight_layout``, which measured every text
    first and made ``savefig`` draw the figure twice (0.15 s of the 0.65 s CPU a job's first
    plot took, matplotlib's import included). Inches, not fractions of the figure: a figure
    that grows with its panels (a column per data set) keeps the same room for the same
    labels. Nothing is measured, so each plot's margins are sized for its labels, and
    ``tests/test_metrics.py`` checks every plot for a label clipped at the edge or running
    into another panel.

    Args:
        fig: a matplotlib ``Figure`` with a grid of subplots.
        left, right, top, bottom: the margins, in inches.
        hspace, wspace: the gaps between rows and between columns, in inches.

    >>> from matplotlib.figure import Figure
    >>> fig = Figure(figsize=(10, 5))
    >>> axes = fig.subplots(2, 2)
    >>> fixed_margins(fig, left=1, right=0.5, top=0.5, bottom=1, hspace=0.5, wspace=1)
    >>> [round(v, 3) for v in axes[1][0].get_position().bounds]    # x, y, width, height
    [0.1, 0.2, 0.375, 0.3]
    """
    width, height = fig.get_size_inches()
    rows, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    # matplotlib's gaps are fractions of the mean subplot's width/height
    cell_w = (width - left - right - (cols - 1) * wspace) / cols
    cell_h = (height - top - bottom - (rows - 1) * hspace) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=wspace / cell_w, hspace=hspace / cell_h)


def plot_png(rows, path: str, title: str = "Online metrics"):
    """Plots AUC, log loss, calibration and examples per window over event time, as a PNG.

    Drawn once, on a figure of its own (no pyplot state, so any thread may call this), with
    fixed margins (:func:`fixed_margins`).

    Args:
        rows: window rows (``transforms.metrics_math.OnlineMetricsAccumulator.flush``).
        path: the PNG file (its folder is made if missing).
        title: the figure's title; a line with the run's numbers is added.

    Returns:
        the matplotlib ``Figure``.
    """
    import datetime

    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda r: r["window_end_ms"])
    column = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in COLUMNS}
    ends = [datetime.datetime.fromtimestamp(r["window_end_ms"] / 1000, datetime.timezone.utc)
            for r in rows]
    fig = Figure(figsize=(10, 9))
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 2, 1]})
    auc_ax, loss_ax, calibration_ax, count_ax = axes
    auc_ax.plot(ends, column["auc"], ".-", lw=1, label="window AUC")
    auc_ax.plot(ends, column["cumulative_auc"], "-", lw=2, label="cumulative AUC")
    if np.isfinite(column["bayes_auc"]).any():
        auc_ax.plot(ends, column["bayes_auc"], "--", lw=1, color="grey",
                    label="true-CTR AUC (ceiling)")
    auc_ax.set_ylabel("AUC")
    auc_ax.axhline(0.5, color="black", lw=0.5)
    auc_ax.legend(loc="lower right")
    loss_ax.plot(ends, column["logloss"], ".-", lw=1, color="tab:red")
    loss_ax.set_ylabel("log loss")
    calibration_ax.plot(ends, column["calibration"], ".-", lw=1, color="tab:green")
    calibration_ax.axhline(1.0, color="black", lw=0.5)
    calibration_ax.set_ylabel("Σ score / Σ label")
    # Steps, not bars: thousands of bar patches take matplotlib tens of seconds.
    count_ax.fill_between(ends, column["examples"], step="pre", color="lightgrey",
                          label="examples")
    count_ax.fill_between(ends, column["positives"], step="pre", color="tab:blue",
                          label="positives")
    count_ax.set_ylabel("per window")
    count_ax.set_xlabel("event time (window end, UTC)")
    count_ax.legend(loc="upper left", fontsize="small")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if rows:
        last = rows[-1]
        title += (f"\n{int(column['examples'].sum()):,} examples in {len(rows)} windows · "
                  f"cumulative AUC {last['cumulative_auc']:.4f} · last window AUC "
                  f"{last['auc']:.4f}")
    fig.suptitle(title)
    fig.autofmt_xdate()
    fixed_margins(fig, left=0.8, right=0.2, top=0.72, bottom=0.9, hspace=0.26)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return fig


def write_report(rows, totals: dict, out_prefix: str, title: str = "Online metrics") -> None:
    """Writes ``{out_prefix}.csv``, ``.png`` (if there are rows) and ``-totals.json``.

    The JSON is replaced atomically: a job's driver polls it (:func:`input_ended`).

    Args:
        rows: window rows (:func:`write_csv`).
        totals: the run's totals (``OnlineMetricsAccumulator.totals``, and anything more).
        out_prefix: the files' path without the suffixes.
        title: the plot's title.
    """
    write_csv(rows, out_prefix + ".csv")
    if rows:
        plot_png(rows, out_prefix + ".png", title)
    tmp = out_prefix + "-totals.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        strict_json.dump(totals, f, indent=2, sort_keys=True)
    os.replace(tmp, out_prefix + "-totals.json")


def input_ended(totals_path: str) -> bool:
    """Whether a report was written when the job's input ended.

    Args:
        totals_path: the report's ``-totals.json`` file.

    Returns:
        its ``end_of_input``: True for the report written at the end of the input, False for
        one written while windows closed before that, or if there is no readable report.

    >>> input_ended("/nonexistent/online-totals.json")
    False
    """
    try:
        with open(totals_path, encoding="utf-8") as f:
            return bool(json.load(f).get("end_of_input"))
    except (OSError, ValueError):
        return False
