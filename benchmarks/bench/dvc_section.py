"""Section ``dvc``: a no-op ``dvc repro`` of the repository's pipeline, timed in a scratch
copy with params.yaml shrunk to tiny runs."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .common import REPO, BenchError, say
from .harness import Bench


def _shrink_params(resolved: dict[str, Any]) -> dict[str, Any]:
    """params.yaml fully resolved (every key dvc.yaml may name is present) with every
    run cut to about a second: the same stages and experiments, tiny data and networks."""
    small = copy.deepcopy(resolved)
    small["data"]["train_subset"] = 200
    small["model"].update(conv_channels=[2, 4, 4], dense_units=8)
    if small["model"]["name"] == "mlp":
        small["model"].update(depth=2, width=8)
    small["train"].update(epochs=1, threads=1)
    small["mlflow"]["log_model"] = False
    for overrides in small.get("experiments", {}).values():
        if isinstance(overrides.get("train"), dict):
            overrides["train"]["epochs"] = 1
        model = overrides.get("model")
        if isinstance(model, dict) and model.get("name") == "mlp":
            model.update(depth=2, width=8)
    tune = small.get("tune")
    if isinstance(tune, dict):
        # 3 epochs: the cosine warmup of the search space must leave a cosine epoch.
        for key, value in (("n_trials", 1), ("epochs", 3), ("workers", 1), ("startup_trials", 1)):
            if key in tune:
                tune[key] = value
    return small


def _dvc_env(extra: dict[str, str]) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


def _timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    tic = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise BenchError(f"{' '.join(command)} failed in {cwd}: {tail}")
    return time.perf_counter() - tic


def dvc_scratch() -> Path:
    """The scratch copy of the pipeline, kept between benchmark runs (outside the repo)."""
    key = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"deepopt-bench-dvc-{key}"


def section_dvc(bench: Bench) -> dict[str, Any]:
    """A no-op ``dvc repro`` of the repository's pipeline (``noop_repro``)."""
    return noop_repro(Path(bench.args.params), bench.args.dvc_runs)


def noop_repro(params_file: Path, runs: int) -> dict[str, Any]:
    """A no-op ``dvc repro`` of the repository's pipeline, timed in a scratch copy:
    dvc.yaml, .dvcignore, .dvc/config and src/ as they are, params.yaml resolved and shrunk
    to tiny runs (the same stages). The copy is kept between runs (``dvc_scratch()``), so
    its ``dvc repro`` first reruns only what changed since (everything, the first time: a
    few minutes). Never in the repository itself: a stage that is not up to date trains."""
    from deepopt.config import load_params, parse_params

    work = dvc_scratch()
    env = _dvc_env({"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"})
    dvc = shutil.which("dvc", path=env["PATH"]) or "dvc"
    if not (work / ".dvc").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        _timed(["git", "init", "-q"], work, env)
        _timed([dvc, "init", "-q"], work, env)
    for name in ("dvc.yaml", ".dvcignore", ".dvc/config"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, work / name)
    shutil.rmtree(work / "src", ignore_errors=True)
    shutil.copytree(
        REPO / "src", work / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    resolved = load_params(params_file).model_dump(mode="json")
    small = _shrink_params(resolved)
    parse_params(small, source="shrunk params.yaml")  # a ConfigError names what to adapt here
    text = yaml.safe_dump(small, sort_keys=False)
    target = work / "params.yaml"
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")
    first = _timed([dvc, "repro"], work, env)
    say(f"  dvc: {work} brought up to date in {first:.1f} s")
    times = [_timed([dvc, "repro"], work, env) for _ in range(runs)]
    stages = subprocess.run(
        [dvc, "stage", "list", "--name-only"], cwd=work, env=env, capture_output=True, text=True
    ).stdout.split()
    median = statistics.median(times)
    say(f"  no-op dvc repro ({len(stages)} stages): {median:.2f} s median")
    return {
        "scratch": str(work),
        "update_repro_s": first,
        "noop_runs_s": times,
        "noop_median_s": median,
        "stages": len(stages),
    }
