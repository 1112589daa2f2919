"""The ``gaugeopt`` command line.

    gaugeopt list                                  the experiments and their presets
    gaugeopt run EXPERIMENT [--preset smoke|full|tiny] [--seeds 0 1 2] [--device auto|cpu|cuda]
                 [--out DIR [--overwrite]] [--set FIELD=VALUE ...] [--threads N] [--no-progress]
    gaugeopt run --resume DIR [--device ...] [--threads N] [--no-progress]
                                                   continue a stopped run from its last completed unit
    gaugeopt report DIR                            rebuild plots and report.md from DIR/results.json
    gaugeopt results DIR... [--output FILE]        the results table (docs/results.md) from run folders
    gaugeopt sweep EXP --preset P --arm A --out DIR a per-arm learning-rate sweep (docs/experiments.md)
    gaugeopt demo [--out DIR [--overwrite]]        overtrain-lm smoke: AdamW vs DDCAdam on bundled text
    gaugeopt gauges MODEL                          the gauges find_gauges discovers on a reference model

Exit status: 0 done; 2 bad input (one line on stderr, nothing written); 1 a run that failed (its
traceback, then what it wrote); 130 interrupted (what was written and how to resume).
"""

from __future__ import annotations

import argparse
import ast
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _parse_override(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` with VALUE a Python literal (numbers, tuples, strings); bare words stay strings."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--set expects FIELD=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(value, list):
        value = tuple(value)
    return name, value


def _cmd_list(args: argparse.Namespace) -> int:
    from .experiments import experiment_names, get_experiment

    for name in experiment_names():
        experiment = get_experiment(name)
        print(f"{name:14s} {experiment.summary}  [presets: {', '.join(experiment.presets)}]")
    return 0


def _execute(run: Any, command: str) -> int:
    """Execute an :class:`~gaugeopt.experiments.runner.ExperimentRun` and say what it left behind."""
    from .experiments import RunInterrupted

    try:
        path = run.execute()
    except RunInterrupted as stop:
        print(f"gaugeopt {command}: {stop}", file=sys.stderr)
        return 130
    except Exception as error:
        if not run.written and isinstance(error, (ValueError, ImportError, OSError)):
            # found while the experiment prepared its data: bad input, and nothing was written
            print(f"gaugeopt {command}: error: {error}", file=sys.stderr)
            return 2
        if not run.written:
            raise
        traceback.print_exc()
        print(f"gaugeopt {command}: failed: {type(error).__name__}: {error}; {run.wrap_up.describe(run.path)}",
              file=sys.stderr)
        return 1
    print(f"report: {path / 'report.md'}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .experiments import ExperimentRun

    if args.resume is not None:
        given = [flag for flag, value in (("EXPERIMENT", args.experiment), ("--preset", args.preset),
                                          ("--seeds", args.seeds), ("--set", args.set), ("--out", args.out),
                                          ("--overwrite", args.overwrite or None)) if value is not None]
        if given:
            raise ValueError(f"--resume continues a run as it was configured; it takes no {', '.join(given)}")
        run = ExperimentRun.resume(args.resume, device=args.device, progress=not args.no_progress,
                                   threads=args.threads)
        done = run.resume_from.completed if run.resume_from else []
        print(f"resuming {args.resume}: " + (f"{len(done)} completed unit(s) kept, continuing after {done[-1]}"
                                             if done else "no unit had completed; starting it again"))
        return _execute(run, "run")
    if args.experiment is None:
        raise ValueError("name an experiment to run (gaugeopt list), or continue a run with --resume DIR")
    overrides = dict(args.set or [])
    seeds = args.seeds
    if "seeds" in overrides:
        if seeds is not None:
            raise ValueError("seeds given twice: use --seeds or --set seeds=..., not both")
        seeds = overrides.pop("seeds")  # one number or a tuple: Experiment.config converts and checks it
    run = ExperimentRun.new(args.experiment, args.preset or "smoke", seeds=seeds, device=args.device, out=args.out,
                            progress=not args.no_progress, threads=args.threads, overwrite=args.overwrite,
                            **overrides)
    return _execute(run, "run")


def _cmd_report(args: argparse.Namespace) -> int:
    from .experiments import write_report
    from .experiments.runfolder import stopped_run_note

    path = write_report(args.run_dir)
    note = stopped_run_note(args.run_dir)
    if note:
        print(f"gaugeopt report: note: {note}", file=sys.stderr)
    print(f"report: {path}")
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from .experiments.results_table import results_markdown

    text = results_markdown([Path(d) for d in args.run_dirs])
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .experiments.sweep import SCALES, sweep_arm

    summary = sweep_arm(args.experiment, args.preset, args.arm, out=args.out, scales=args.scales or SCALES,
                        device=args.device, progress=not args.no_progress, extend=args.extend)
    readings = ", ".join(f"x{factor}: {value:.4g}" for factor, value in summary["readings"].items())
    print(f"{args.experiment} {args.preset}, arm {args.arm} ({summary['selection']}): {readings}")
    edge = " (at the edge of the grid)" if summary["at_edge"] else ""
    print(f"chosen lr scale: {summary['chosen_scale']:g}{edge}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiments import ExperimentRun, read_results
    from .experiments.report import terminal_summary

    run = ExperimentRun.new("overtrain-lm", "smoke", device=args.device, out=args.out,
                            progress=not args.no_progress, threads=args.threads, overwrite=args.overwrite)
    print("gaugeopt demo: overtrain-lm smoke preset, AdamW vs DDCAdam on Hamlet (character level), "
          "3 seeds, trained past the point of fit")
    status = _execute(run, "demo")
    if status == 0:
        print()
        print(terminal_summary(read_results(run.path)))
    return status


def _cmd_gauges(args: argparse.Namespace) -> int:
    import torch

    import gaugeopt
    from gaugeopt import models

    builders = {
        "lm": lambda: (models.TransformerLM(models.TransformerLMConfig()), torch.randint(0, 65, (2, 8))),
        "vit": lambda: (models.ViT(models.ViTConfig()), torch.rand(2, 1, 8, 8)),
        "modadd": lambda: (models.ModularAdditionTransformer(models.ModularAdditionConfig(modulus=11, d_model=32,
                                                                                          d_ff=64, n_layers=2)),
                           torch.randint(0, 11, (2, 2))),
        "moe": lambda: (models.MoELM(models.MoEConfig()), torch.randint(0, 65, (2, 8))),
        "mlp": lambda: (models.ReLUMLP(models.ReLUMLPConfig()), torch.rand(2, 8)),
        "cnn": lambda: (models.PlainCNN(models.PlainCNNConfig()), torch.rand(2, 1, 8, 8)),
        "resnet18": lambda: (models.ResNet18(models.ResNet18Config()), torch.rand(2, 3, 32, 32)),
    }
    model, example = builders[args.model]()
    print(gaugeopt.find_gauges(model, example, output="logits").summary(print_table=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .experiments.registry import EXPERIMENT_MODULES, PRESETS

    parser = argparse.ArgumentParser(prog="gaugeopt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="list the experiments").set_defaults(handler=_cmd_list)

    run = sub.add_parser("run", help="run one experiment into a run folder")
    run.add_argument("experiment", nargs="?", choices=list(EXPERIMENT_MODULES))
    run.add_argument("--preset", help=f"{', '.join(PRESETS)} (smoke is the default), or an experiment's own "
                                      f"(gaugeopt list names them)")
    run.add_argument("--seeds", type=int, nargs="+", help="replace the preset's seeds")
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    run.add_argument("--out", type=Path, help="run folder, new or empty (default runs/<experiment>-<preset>-<time>)")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    run.add_argument("--set", type=_parse_override, action="append", metavar="FIELD=VALUE",
                     help="override one config field, e.g. --set steps=200 (repeatable)")
    run.add_argument("--threads", type=int, default=1, help="torch CPU threads for the run (default 1)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    run.add_argument("--resume", type=Path, metavar="DIR",
                     help="continue the stopped run in DIR from its last completed unit (same config)")
    run.set_defaults(handler=_cmd_run)

    report = sub.add_parser("report", help="rebuild plots and report.md from results.json")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(handler=_cmd_report)

    results = sub.add_parser("results", help="the results table of docs/results.md from run folders")
    results.add_argument("run_dirs", nargs="+")
    results.add_argument("--output", type=Path, help="write the Markdown here instead of printing it")
    results.set_defaults(handler=_cmd_results)

    sweep = sub.add_parser("sweep", help="a per-arm learning-rate sweep by the pre-registered protocol")
    sweep.add_argument("experiment", choices=list(EXPERIMENT_MODULES))
    sweep.add_argument("--preset", required=True)
    sweep.add_argument("--arm", required=True)
    sweep.add_argument("--out", type=Path, required=True, help="folder for one run folder per factor")
    sweep.add_argument("--scales", type=float, nargs="+", help="factors of the arm's rates (default 1/4 .. 4)")
    sweep.add_argument("--extend", action="store_true", help="once, go one factor beyond a winner at the edge")
    sweep.add_argument("--device", default="auto")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.set_defaults(handler=_cmd_sweep)

    demo = sub.add_parser("demo", help="the overtrain-lm smoke comparison (a few minutes on 2 CPU cores)")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--out", type=Path)
    demo.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    demo.add_argument("--threads", type=int, default=1)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=_cmd_demo)

    gauges = sub.add_parser("gauges", help="print the gauges found on a small reference model")
    gauges.add_argument("model", choices=["lm", "vit", "modadd", "moe", "mlp", "cnn", "resnet18"])
    gauges.set_defaults(handler=_cmd_gauges)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError, ImportError) as error:  # bad input: raised before anything was written
        print(f"gaugeopt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gaugeopt {args.command}: interrupted before anything was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
