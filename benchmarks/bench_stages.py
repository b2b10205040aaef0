"""What each pipeline stage costs beyond its work: the real ``deepopt`` CLI as a subprocess
(as ``dvc repro`` runs it) on a tiny experiment, wall time minus the work the stage reports
doing in-process (training seconds, evaluation seconds, the tune session's trial seconds).

    .venv/bin/python benchmarks/bench_stages.py            # 5 interleaved runs, about 4 min
    .venv/bin/python benchmarks/bench_stages.py --runs 1 --no-dvc

Every run of every stage starts from the same state (train and tune lose their checkpoints
and study first, so they train again). Stages run interleaved (prepare, train, evaluate,
report, tune, --help; then again), so a slow spell of the machine spreads over all of them;
medians are reported. Each stage also runs once under ``python -X importtime``: the
packages whose imports cost the most, lazy imports during the run included. The no-op
``dvc repro`` is timed in the training benchmark's scratch copy of the whole pipeline
(bench/dvc_section.py). Results: a markdown table on stdout, JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from bench.common import REPO, RESULTS_DIR, say
from bench.dvc_section import noop_repro

# stage -> (command after `deepopt`, the summary key of the work done in-process)
STAGES: dict[str, tuple[list[str], str | None]] = {
    "prepare": (["prepare"], None),
    "train": (["train", "--experiment", "startup"], "train_seconds"),
    "evaluate": (["evaluate", "--experiment", "startup"], "eval_seconds"),
    "report": (["report"], None),
    "tune": (["tune"], "seconds"),
    "help": (["--help"], None),
}
# What any stage that records to MLflow pays before its own code runs: the interpreter, torch,
# mlflow and MLflow's sqlite store module, imported and nothing else. Timed in the same
# interleaved rounds, so a row's wall − work can be read against this host's floor.
FLOOR_IMPORTS = "import torch, mlflow, mlflow.store.tracking.sqlalchemy_store"
# stage -> the median of wall minus work it must stay within (issue #15's targets), seconds
TARGETS_S = {"train": 3.0, "evaluate": 2.0, "report": 2.0, "help": 0.1, "dvc": 1.5}
# Outputs removed before a run so that the stage does its whole work again.
FRESH = {"train": ["checkpoints/startup"], "tune": ["optuna.db", "params", "checkpoints/tune"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs per stage")
    parser.add_argument("--no-dvc", action="store_true", help="skip the no-op dvc repro")
    parser.add_argument("--dvc-runs", type=int, default=5, help="no-op dvc repro runs")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="base params.yaml")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON")
    args = parser.parse_args()
    if args.runs < 1 or args.dvc_runs < 1:
        parser.error("--runs and --dvc-runs take a whole number of at least 1")
    return args


def tiny_params(base: dict[str, Any]) -> dict[str, Any]:
    """params.yaml with one experiment ``startup``: the lecture CNN as the matrix trains it
    (model logged, MLflow and checkpoints on), on 540 images for 2 epochs; a tune study of
    one 3-epoch trial in one process."""
    params = copy.deepcopy(base)
    params["data"]["train_subset"] = 600
    params["train"]["epochs"] = 2
    params["experiments"] = {"startup": {}}
    # 3 epochs per trial: the search space's cosine warmup must leave a cosine epoch.
    params["tune"].update(
        experiment="startup", n_trials=1, epochs=3, workers=1, startup_trials=1, study_name=None
    )
    return params


def deepopt_command() -> list[str]:
    return [str(Path(sys.executable).with_name("deepopt"))]


def environment(work: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"}


def run_once(stage: str, work: Path, prefix: list[str] | None = None) -> dict[str, Any]:
    """One run of ``stage`` from a fresh state: wall seconds, the work it reports, stderr."""
    for name in FRESH.get(stage, []):
        target = work / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    argv, work_key = STAGES[stage]
    command = (prefix or deepopt_command()) + argv
    tic = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=environment(work), capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise SystemExit(f"bench_stages: `deepopt {' '.join(argv)}` failed: {tail}")
    work_s = 0.0
    if work_key is not None:
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        work_s = float(summary[work_key])
    return {"wall_s": wall, "work_s": work_s, "fixed_s": wall - work_s, "stderr": done.stderr}


def floor_once() -> float:
    """Wall seconds of a python that imports FLOOR_IMPORTS and exits."""
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR_IMPORTS], check=True)
    return time.perf_counter() - tic


def import_costs(stderr: str, top: int = 8) -> list[tuple[str, float]]:
    """``-X importtime``'s self times summed by package (torch's subpackages apart, where
    torch._dynamo and torch.export hide): the ``top`` most expensive, in seconds."""
    totals: dict[str, float] = defaultdict(float)
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "torch" and len(parts) > 1 else parts[0]
        totals[key] += int(self_us) / 1e6
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


def setup_workspace(root: Path, params_file: Path) -> Path:
    """A repository-like folder (git, so runs log to its own mlruns/) with the tiny params
    and data/prepared/, and everything the later stages read made once."""
    work = root / "work"
    work.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    base = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(base)), encoding="utf-8")
    for stage in ("prepare", "train", "evaluate", "report", "tune"):
        run_once(stage, work)  # also warms the OS file cache for the timed runs
    return work


def measure(work: Path, runs: int) -> dict[str, Any]:
    times: dict[str, list[dict[str, float]]] = {stage: [] for stage in STAGES}
    floor: list[float] = []
    for run in range(runs):
        for stage in STAGES:
            result = run_once(stage, work)
            times[stage].append({k: v for k, v in result.items() if k != "stderr"})
        floor.append(floor_once())
        say(
            f"  run {run + 1}/{runs}: "
            + ", ".join(f"{stage} {times[stage][-1]['fixed_s']:.2f} s" for stage in STAGES)
            + f", floor {floor[-1]:.2f} s"
        )
    imports = {}
    for stage in STAGES:
        traced = run_once(stage, work, [sys.executable, "-X", "importtime", "-m", "deepopt.cli"])
        imports[stage] = import_costs(traced["stderr"])
    stages: dict[str, Any] = {
        stage: {
            "runs": rows,
            "wall_median_s": statistics.median(r["wall_s"] for r in rows),
            "work_median_s": statistics.median(r["work_s"] for r in rows),
            "fixed_median_s": statistics.median(r["fixed_s"] for r in rows),
            "imports_s": imports[stage],
        }
        for stage, rows in times.items()
    }
    stages["floor"] = {
        "runs": [{"wall_s": s, "work_s": 0.0, "fixed_s": s} for s in floor],
        "wall_median_s": statistics.median(floor),
        "work_median_s": 0.0,
        "fixed_median_s": statistics.median(floor),
        "imports_s": [],
    }
    return stages


def markdown(stages: dict[str, Any], dvc: dict[str, Any] | None) -> str:
    lines = [
        "| stage | wall (median) | its work | wall − work | target | top imports (self time) |",
        "|---|---|---|---|---|---|",
    ]
    for stage, row in stages.items():
        if stage == "floor":
            lines.append(
                f'| floor: `python -c "{FLOOR_IMPORTS}"` | {row["wall_median_s"]:.2f} s | — '
                f"| {row['fixed_median_s']:.2f} s | — | (what a recording stage cannot avoid) |"
            )
            continue
        target = TARGETS_S.get(stage)
        verdict = (
            "—"
            if target is None
            else f"≤ {target:g} s: {'met' if row['fixed_median_s'] <= target else 'missed'}"
        )
        top = ", ".join(f"{name} {seconds:.2f}" for name, seconds in row["imports_s"][:4])
        lines.append(
            f"| `{' '.join(['deepopt', *STAGES[stage][0]])}` | {row['wall_median_s']:.2f} s "
            f"| {row['work_median_s']:.2f} s | {row['fixed_median_s']:.2f} s | {verdict} "
            f"| {top} |"
        )
    if dvc is not None:
        met = "met" if dvc["noop_median_s"] <= TARGETS_S["dvc"] else "missed"
        lines.append(
            f"| no-op `dvc repro` ({dvc['stages']} stages) | {dvc['noop_median_s']:.2f} s | — "
            f"| {dvc['noop_median_s']:.2f} s | ≤ {TARGETS_S['dvc']:g} s: {met} | — |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="deepopt-bench-stages-") as root:
        say(f"bench_stages: setting up a tiny workspace in {root}")
        work = setup_workspace(Path(root), Path(args.params))
        say(f"bench_stages: {args.runs} interleaved runs of {', '.join(STAGES)}")
        stages = measure(work, args.runs)
    dvc = None if args.no_dvc else noop_repro(Path(args.params), args.dvc_runs)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "started": started,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "git_commit": commit or None,
        "load_average": os.getloadavg(),
        "runs": args.runs,
        "stages": stages,
        "dvc": dvc,
        "targets_s": TARGETS_S,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"stages-{started}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    say(markdown(stages, dvc))
    say(f"bench_stages: wrote {path}")


if __name__ == "__main__":
    main()
