"""Where a stage's fixed time goes: the real ``deepopt train`` / ``deepopt evaluate`` of
bench_stages.py's tiny workspace, run in a child process with wall-clock timers wrapped
around the parts that cost (imports, the MLflow store, the optimizer's first use of
torch._dynamo, the logged model and its pieces, figures, MLflow calls).

    .venv/bin/python benchmarks/stage_breakdown.py              # train and evaluate, 3 runs
    .venv/bin/python benchmarks/stage_breakdown.py --runs 5 --stage train

Timers nest (``log_model`` contains its dependency scan and its torch.export), so a column
does not add up to the wall time; ``rest`` is the wall time outside the top-level parts.
Medians over the runs; a markdown table on stdout, JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS_DIR, say

# (module, attribute path, label, top-level?) wrapped in the child after its imports.
# Top-level parts do not overlap one another; nested ones are inside a top-level part.
PARTS: list[tuple[str, str, str, bool]] = [
    # Stages call the names deepopt.tracking re-exports; the store calls its own.
    ("deepopt.tracking", "configure", "open the MLflow store (sqlalchemy, alembic)", True),
    ("deepopt.tracking.store", "configure", "open the MLflow store (sqlalchemy, alembic)", True),
    ("deepopt.training.member", "build_optimizer", "first optimizer: imports torch._dynamo", True),
    ("deepopt.training.member", "fit", "training (the work)", True),
    ("deepopt.stages.evaluate", "evaluate_replicas", "evaluation (the work)", True),
    ("deepopt.tracking", "log_model", "log_model (pt2)", True),
    (
        "mlflow.utils.requirements_utils",
        "_init_modules_to_packages_map",
        "  of which: MLflow's scan of installed packages",
        False,
    ),
    ("torch.export", "export", "  of which: torch.export", False),
    ("deepopt.figures", "plot_history", "history figure (matplotlib)", True),
    ("deepopt.stages.evaluate", "replica_pngs", "confusion/misclassified PNGs", True),
    ("deepopt.tracking", "log_figure", "log figures", True),
]
IMPORTS = [("torch", "import torch"), ("mlflow", "import mlflow")]


def child(stage: str) -> None:
    """Run ``deepopt <stage> --experiment startup`` here with timers; print them as JSON."""
    seconds: dict[str, float] = {}
    for module, label in IMPORTS:
        tic = time.perf_counter()
        importlib.import_module(module)
        seconds[label] = time.perf_counter() - tic
    import mlflow.utils.requirements_utils  # noqa: F401  (so its function can be wrapped)
    import torch.export  # noqa: F401

    for module, attribute, label, _ in PARTS:
        _wrap(importlib.import_module(module), attribute, label, seconds)
    from deepopt.cli import main as cli_main

    sys.argv = ["deepopt", stage, "--experiment", "startup"]
    try:
        cli_main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    print(json.dumps(seconds), file=sys.stderr)


def _wrap(owner: Any, attribute: str, label: str, seconds: dict[str, float]) -> None:
    function: Callable[..., Any] = getattr(owner, attribute)

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        tic = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - tic

    setattr(owner, attribute, timed)


def run_child(stage: str, work: Path) -> dict[str, float]:
    """One child run of ``stage`` from a fresh state; its parts and its wall time as a whole
    process (interpreter start included), measured here."""
    from bench_stages import FRESH, environment

    for name in FRESH.get(stage, []):
        target = work / name
        if target.is_dir():
            shutil.rmtree(target)
    tic = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", stage],
        cwd=work,
        env={**environment(work), "PYTHONPATH": str(Path(__file__).resolve().parent)},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - tic
    if done.returncode != 0:
        raise SystemExit(f"stage_breakdown: {stage} failed: {done.stderr.strip()[-500:]}")
    parts: dict[str, float] = json.loads(done.stderr.strip().splitlines()[-1])
    return {**parts, "wall": wall}


def table(stage: str, runs: list[dict[str, float]]) -> str:
    labels = [label for _, label in IMPORTS]
    labels += list(dict.fromkeys(label for *_, label, _ in PARTS))
    top = {label for _, label in IMPORTS} | {label for *_, label, is_top in PARTS if is_top}
    median = {
        label: statistics.median(run.get(label, 0.0) for run in runs) for label in [*labels, "wall"]
    }
    rest = median["wall"] - sum(median[label] for label in top)
    lines = [f"| `deepopt {stage}`: part | median s |", "|---|---|"]
    lines += [f"| {label} | {median[label]:.2f} |" for label in labels if median[label] >= 0.005]
    lines += [
        f"| rest (interpreter, deepopt and pydantic imports, data, files, other MLflow calls) "
        f"| {rest:.2f} |",
        f"| **wall** | **{median['wall']:.2f}** |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per stage (medians)")
    parser.add_argument("--stage", choices=["train", "evaluate"], action="append")
    parser.add_argument("--child", choices=["train", "evaluate"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.runs < 1:
        parser.error("--runs takes a whole number of at least 1")
    stages = args.stage or ["train", "evaluate"]
    from bench_stages import setup_workspace

    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results: dict[str, list[dict[str, float]]] = {stage: [] for stage in stages}
    with tempfile.TemporaryDirectory(prefix="deepopt-stage-breakdown-") as root:
        work = setup_workspace(Path(root), REPO / "params.yaml")
        for run in range(args.runs):
            for stage in stages:
                results[stage].append(run_child(stage, work))
            say(f"  run {run + 1}/{args.runs} done")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"breakdown-{started}.json"
    path.write_text(json.dumps({"started": started, "runs": results}, indent=2) + "\n")
    for stage in stages:
        say(table(stage, results[stage]))
    say(f"stage_breakdown: wrote {path}")


if __name__ == "__main__":
    main()
