"""PNG plots rendered from ``results.json`` alone (matplotlib, Agg backend).

Two sources:
- ``curves``: every series logged with ``RunFolder.log_point`` against its ``step`` series gives
  ``curve_<series>.png``, one line per (arm, seed), one colour per arm.
- ``figures``: declarative specs an experiment adds with ``RunFolder.add_figure``::

      {"file": "gap.png", "kind": "line" | "scatter" | "bar", "title": str,
       "xlabel": str, "ylabel": str, "xscale": "linear" | "log", "yscale": "linear" | "log",
       "series": [{"label": str, "x": [...], "y": [...]}],
       "hlines": [{"y": float, "label": str | None, "style": "dashed" | "dotted"}]}

  For ``bar`` the x values are category names shared by all series (grouped bars). ``hlines`` draw
  the thresholds a verdict uses. Curves get readable axis labels from :data:`SERIES_LABELS`, and
  the thresholds in ``results["curve_lines"][series]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVE_PREFIX = "curve_"

# Axis labels of the logged series (a series not listed is shown with spaces for underscores).
SERIES_LABELS = {
    "train_loss": "training loss (nats)", "val_loss": "validation loss (nats)",
    "gap": "validation - training loss (nats)", "val_acc": "validation accuracy",
    "train_acc": "training accuracy", "compressed_units": "fraction of FFN units compressed",
    "load_cv": "router load CV (mean over layers)", "max_load": "largest expert load share",
    "dead_fraction": "fraction of experts with no tokens", "logit_rms": "router logit RMS",
    "z_loss": "router z-loss", "gain_mean": "mean norm gain |g| (all RMSNorms)",
    "head_logit_rms": "LM-head logit RMS (validation windows)",
    "gain_log_drift_rms": "RMS drift of log|g| from the start (norm gains)",
    "neuron_balance_drift_rms": "RMS drift of log(|in|/|out|) (FFN neurons)",
}


def series_label(name: str) -> str:
    return SERIES_LABELS.get(name, name.replace("_", " "))


def _finite_pairs(xs: list, ys: list) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def curve_figures(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Figure specs for every logged series (against ``step``), one file per series name."""
    names: list[str] = []
    for seeds in results.get("curves", {}).values():
        for series in seeds.values():
            names += [n for n in series if n != "step" and n not in names]
    figures = []
    for name in names:
        lines = []
        for arm, seeds in results["curves"].items():
            for seed, series in seeds.items():
                if name in series and "step" in series:
                    lines.append({"label": f"{arm} (seed {seed})", "arm": arm,
                                  "x": series["step"][: len(series[name])], "y": series[name]})
        positive = all(y is None or y > 0 for line in lines for y in line["y"])
        figures.append({"file": f"{CURVE_PREFIX}{name}.png", "kind": "line", "title": series_label(name),
                        "xlabel": "training step", "ylabel": series_label(name), "xscale": "linear",
                        "yscale": "log" if positive and "loss" in name else "linear", "series": lines,
                        "hlines": results.get("curve_lines", {}).get(name, [])})
    return figures


def render_figure(figure: dict[str, Any], path: Path) -> None:
    kind = figure.get("kind", "line")
    series = figure.get("series", [])
    categories = list(dict.fromkeys(c for s in series for c in s["x"])) if kind == "bar" else []
    fig, ax = plt.subplots(figsize=(max(6.4, 0.2 * len(categories) * max(1, len(series)) ** 0.5), 4.6), dpi=110)
    if kind == "bar":
        width = 0.8 / max(1, len(series))
        for i, s in enumerate(series):
            lookup = dict(zip(s["x"], s["y"]))
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
            ys = [lookup.get(c) if lookup.get(c) is not None else float("nan") for c in categories]
            ax.bar(xs, ys, width=width, label=s["label"])
        many = len(categories) > 12
        ax.set_xticks(range(len(categories)), [str(c) for c in categories], rotation=90 if many else 30,
                      ha="center" if many else "right", fontsize=7 if many else None)
    else:
        arm_colours: dict[str, Any] = {}
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for s in series:
            arm = s.get("arm", s["label"])
            colour = arm_colours.setdefault(arm, cycle[len(arm_colours) % len(cycle)])
            label = arm if s.get("arm") else s["label"]
            already = s.get("arm") and any(line.get_label() == label for line in ax.get_lines())
            xs, ys = _finite_pairs(s["x"], s["y"])
            if kind == "scatter":
                ax.scatter(xs, ys, label=s["label"], s=18)
            else:
                ax.plot(xs, ys, color=colour, label="_nolegend_" if already else label, lw=1.3, alpha=0.85)
        for axis, scale in (("x", figure.get("xscale")), ("y", figure.get("yscale"))):
            if scale == "log":
                (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    for line in figure.get("hlines", []):
        if line.get("y") is not None:
            ax.axhline(line["y"], color="0.35", lw=1.0, ls=":" if line.get("style") == "dotted" else "--",
                       label=line.get("label") or "_nolegend_")
    ax.set_title(figure.get("title", ""), fontsize=10)
    ax.set_xlabel(figure.get("xlabel", ""))
    ax.set_ylabel(figure.get("ylabel", ""))
    if series:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_plots(results: dict[str, Any], run_dir: str | Path) -> list[str]:
    """Write every curve and declared figure as PNG into ``run_dir``; returns the file names."""
    run_dir = Path(run_dir)
    written = []
    for figure in [*curve_figures(results), *results.get("figures", [])]:
        render_figure(figure, run_dir / figure["file"])
        written.append(figure["file"])
    return written
