"""``report.md`` rendered from ``results.json`` alone, so ``gaugeopt report DIR`` can rebuild it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plots import render_plots
from .runfolder import read_results

VERDICT = {True: "reproduced", False: "not reproduced", None: "not decided"}

# What each verdict means, in the words the terminal summary prints under the table.
VERDICT_MEANINGS = {
    "reproduced": "our runs show the paper's effect: the 95 % interval over seeds lies on the paper's side "
                  "(and where the claim has a size fixed before the run, the size holds too)",
    "direction only": "our arm is better in the paper's direction, but by less than the size fixed before the run",
    "not reproduced": "the 95 % interval over seeds contains no difference, or lies on the other side",
    "not decided": "too few seeds (or runs) to reach a verdict",
    "not measurable": "the runs never reach the state the claim is about (the reason is given)",
    "not measurable (instrument)": "the instrument that would measure it has not passed its known-answer "
                                   "validation, so no number is reported as a finding",
    "met": "the run is in the regime the paper's claim is about (a precondition, not a claim)",
    "not met": "the run is not in the regime the paper's claim is about, so the rows below it test a milder "
               "setting than the paper's",
    "validated": "the instrument read the known answer (planted cells, and no control)",
    "not validated": "the instrument did not read the known answer",
}
TERMS = {
    "cell": "a cell is one (site, observable) pair of the dead-direction readout: a site is a layer's output "
            "(e.g. block 0's query projection, the LM head), an observable one spectral statistic of the "
            "activations (A) or of the per-token gradients (G) there; a cell 'reads' when that statistic falls "
            "as a clean power of the distance to a singular point",
    "seed": "a seed is one pair of runs, one per optimizer, that start from the same weights and see the same "
            "batches; intervals are over these pairs",
}


def verdict_label(claim: dict[str, Any]) -> str:
    """The verdict words of a claim row: its own label when it has one ("not measurable", ...)."""
    return claim.get("verdict") or VERDICT[claim["reproduced"]]


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value[:12]) + (", ..." if len(value) > 12 else "") + "]"
    return "—" if value is None else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def render_report(results: dict[str, Any], figure_files: list[str]) -> str:
    env = results.get("environment", {})
    source, machine, versions = env.get("source", {}), env.get("machine", {}), env.get("versions", {})
    commit = source.get("commit") or "unknown"
    lines = [f"# {results['experiment']} ({results['preset']} preset)", ""]
    status = results.get("status", "unknown")
    if status != "complete":
        lines += [f"> **Status: {status}.** This report shows what had been measured when the run "
                  f"stopped{': ' + results['error'] if results.get('error') else ''}.", ""]
    lines += [
        f"- started {results.get('started')}, finished {results.get('finished') or '—'}",
        f"- commit `{commit[:12]}`{' (with local changes)' if source.get('dirty') else ''}",
        f"- machine: {machine.get('processor')}, {machine.get('cpu_count')} CPU cores, device "
        f"`{machine.get('device')}`{', ' + machine['accelerator'] if machine.get('accelerator') else ''}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- seeds: {results.get('seeds')}",
        "",
        "## Verdict",
        "",
    ]
    claims = results.get("claims", [])
    if results.get("reading"):
        lines += ["**Reading:** " + " ".join(results["reading"]), ""]
    if claims:
        lines += _table(["claim", "paper", "ours", "verdict", "note"],
                        [[c["claim"], c["anchor"], c["ours"], verdict_label(c), c.get("note", "")]
                         for c in claims])
    else:
        lines.append("No claim was evaluated: " + ("the run stopped before its end." if status != "complete"
                     else "the arms or sizes run do not include a paper comparison."))
    if results.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in results["notes"]]
    for table in results.get("tables", []):
        lines += ["", f"## {table['title']}", ""]
        lines += _table(table["header"], table["rows"])
        if table.get("note"):
            lines += ["", table["note"]]
    metrics = results.get("metrics", {})
    if metrics:
        names = list(dict.fromkeys(n for m in metrics.values() for n in m))
        lines += ["", "## Metrics", ""]
        if len(names) <= 8:
            lines += _table(["arm", *names], [[arm, *(m.get(n) for n in names)] for arm, m in metrics.items()])
        else:  # many heterogeneous metrics: one row per (arm, metric)
            lines += _table(["arm", "metric", "value"],
                            [[arm, name, value] for arm, m in metrics.items() for name, value in m.items()])
    if results.get("timings"):
        lines += ["", "## Timings (seconds)", ""]
        lines += _table(["phase", "seconds"], [[k, v] for k, v in results["timings"].items()])
    lines += ["", "## Configuration", ""]
    lines += _table(["field", "value"], [[k, v] for k, v in results.get("config", {}).items()])
    if figure_files:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({name})" for name in figure_files]
    return "\n".join(lines) + "\n"


def terminal_summary(results: dict[str, Any], width: int = 100) -> str:
    """The verdict table of a run as plain text for a terminal, then the run's reading of it."""
    import textwrap

    claims = results.get("claims", [])
    lines = [f"Verdicts: {results['experiment']} ({results['preset']} preset, {len(results.get('seeds') or [])} "
             f"seed(s), status {results.get('status')})", ""]
    for number, claim in enumerate(claims, 1):
        lines.append(f"{number}. {claim['claim']}  ->  {verdict_label(claim).upper()}")
        lines += textwrap.wrap(f"paper: {claim['anchor']}", width, initial_indent="     ", subsequent_indent="     ")
        lines += textwrap.wrap(f"ours:  {claim['ours']}", width, initial_indent="     ", subsequent_indent="       ")
        if claim.get("note"):
            lines += textwrap.wrap(f"why:   {claim['note']}", width, initial_indent="     ", subsequent_indent="       ")
    if not claims:
        lines.append("(no claim was evaluated)")
    if results.get("reading"):
        lines += ["", "Reading:"] + [textwrap.fill(text, width, initial_indent="  ", subsequent_indent="  ")
                                     for text in results["reading"]]
    labels = list(dict.fromkeys(verdict_label(claim) for claim in claims))
    text = " ".join(claim["claim"] + claim["ours"] for claim in claims)
    glossary = [f"{label.upper()}: {VERDICT_MEANINGS[label]}" for label in labels if label in VERDICT_MEANINGS]
    glossary += [meaning for term, meaning in TERMS.items() if term in text]
    if glossary:
        lines += ["", "How to read this:"] + [textwrap.fill(entry, width, initial_indent="  - ",
                                                            subsequent_indent="    ") for entry in glossary]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Re-render every plot and ``report.md`` in ``run_dir`` from its ``results.json``."""
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    figure_files = render_plots(results, run_dir)
    path = run_dir / "report.md"
    path.write_text(render_report(results, figure_files))
    return path
