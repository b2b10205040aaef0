"""The ``deepopt`` command: one subcommand per pipeline stage.

Stage modules (and with them torch, mlflow, optuna) are imported only when their command
runs, so ``deepopt --help`` stays fast. Expected failures print one line and exit with the
code of their error class (see deepopt.errors); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deepopt import __version__, interrupts
from deepopt.errors import EXIT_INTERRUPTED, DeepoptError

__all__ = ["main"]


def _stage(module: str) -> Callable[..., dict[str, Any]]:
    """The stage's ``main``, imported only when it runs: ``--help`` imports no torch."""
    return importlib.import_module(f"deepopt.stages.{module}").main  # type: ignore[no-any-return]


def _add_stage(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(stage=name)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepopt",
        description="Reproducible experiments of a deep-learning lecture (run from the repo root).",
    )
    parser.add_argument("--version", action="version", version=f"deepopt {__version__}")
    parser.add_argument(
        "--params", default="params.yaml", type=Path, help="params file (default: params.yaml)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_stage(sub, "prepare", "read the raw IDX files, split them and write data/prepared/")
    train = _add_stage(
        sub, "train", "train an experiment (default: the base config), record it in MLflow"
    )
    train.add_argument(
        "--experiment", metavar="NAME", help="an entry of params.yaml experiments (default: base)"
    )
    evaluate = _add_stage(
        sub, "evaluate", "test-set metrics and plots of a trained experiment, into its MLflow run"
    )
    evaluate.add_argument(
        "--experiment", metavar="NAME", help="an entry of params.yaml experiments (default: base)"
    )
    for stage in (train, evaluate):
        stage.add_argument(
            "--overrides",
            metavar="FILE",
            type=Path,
            help="YAML overrides applied on top (e.g. params/best.yaml); with it, a NAME that "
            "is not an experiment only names the outputs and the base config is used",
        )
    lr_find = _add_stage(
        sub, "lr-find", "LR range test of an experiment: lr_find/NAME.json, .csv and .png, MLflow"
    )
    lr_find.set_defaults(stage="lr_find")  # the module's name
    lr_find.add_argument(
        "--experiment", metavar="NAME", help="an entry of params.yaml experiments (default: base)"
    )
    _add_stage(sub, "report", "write reports/lecture.md and its plots from metrics/ and plots/")
    _add_stage(sub, "figures", "draw the lecture's figures into figures/ and log them to MLflow")
    _add_tune(sub)
    _add_stage(sub, "pretrain", "train on transfer.source; write transfer/models/pretrain.pt")
    _add_stage(
        sub, "finetune", "fine-tune the pretrained network on transfer.target; transfer/report.md"
    )
    _add_compare(sub)
    return parser


def _add_compare(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The compare pipeline's stages (compare/dvc.yaml): which optimizer, tuned fairly."""
    seeds = _add_stage(
        sub, "compare-seeds", "every compared optimizer over compare.seeds seeds, tested"
    )
    seeds.set_defaults(stage="compare_seeds")
    seeds.add_argument(
        "--settings",
        choices=("default", "tuned"),
        default="default",
        help="the Keras defaults, or each study's best trial (default: default)",
    )
    tune = _add_stage(
        sub, "compare-tune", "one Optuna study per compared optimizer, compare.budget trials each"
    )
    tune.set_defaults(stage="compare_tune")
    report = _add_stage(
        sub, "compare-report", "compare/report.md: default vs tuned, vs the best, the verdict"
    )
    report.set_defaults(stage="compare_report")


def _add_tune(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tune = _add_stage(
        sub, "tune", "run (or resume) the Optuna study of params.yaml tune; write params/best.yaml"
    )
    tune.add_argument(
        "--worker",
        action="store_true",
        help="only run trials of the study (another session writes best.yaml)",
    )
    tune.add_argument("--storage", metavar="URL", help="Optuna storage (default: tune.storage)")
    tune.add_argument(
        "--n-trials", type=int, metavar="N", help="finished trials the study should hold"
    )
    tune.add_argument("--study-name", metavar="NAME", help="default: tune.study_name or derived")
    # Set by the session that starts the workers.
    tune.add_argument("--parent-run", help=argparse.SUPPRESS)
    tune.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    tune.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    tune.add_argument("--session-pid", type=int, help=argparse.SUPPRESS)
    tune.add_argument("--label", help=argparse.SUPPRESS)  # compare-tune's study label


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from deepopt.config import load_params  # pydantic + yaml only: cheap

    params = load_params(args.params)
    options = {
        key: value for key, value in vars(args).items() if key not in {"command", "stage", "params"}
    }
    return _stage(args.stage)(params, **options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # MLflow's INFO lines (database creation, migrations) would bury our one-line errors.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    try:
        with interrupts.handling_interrupts():  # Ctrl-C and SIGTERM alike
            summary = _run(args)
    except DeepoptError as err:
        print(f"deepopt: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("deepopt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps(summary, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
