"""What MLflow's check of a logged model's serving example costs: ``mlflow.pytorch.log_model``
of the lecture CNN (pt2, the input example and pins deepopt logs) with
``validate_serving_input`` on and off, in interleaved pairs in one warm process, into a
throw-away sqlite store. ``deepopt.tracking.log_model`` logs with it off (one model a seed);
the test suite runs the check instead (tests/tracking/test_tracking.py), and
tests/system/test_bench.py runs this script.

    .venv/bin/python benchmarks/bench_log_model.py              # 8 pairs, about 15 s
    .venv/bin/python benchmarks/bench_log_model.py --pairs 20

Prints the medians and the paired difference; JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS_DIR, load, say


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="interleaved on/off pairs")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs takes a whole number of at least 1")
    return args


def measure(pairs: int, store: Path) -> dict[bool, list[float]]:
    """Seconds of each log_model call, by the value of validate_serving_input."""
    import mlflow
    import mlflow.pytorch
    import numpy as np

    from deepopt.config import ModelConfig
    from deepopt.models import build_model
    from deepopt.tracking.provenance import pip_requirements

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    experiment = mlflow.create_experiment("bench", artifact_location=(store / "art").as_uri())
    model = build_model(ModelConfig()).eval()
    example = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    seconds: dict[bool, list[float]] = {True: [], False: []}

    def log(name: str, validate: bool) -> float:
        tic = time.perf_counter()
        mlflow.pytorch.log_model(
            model,
            name=name,
            input_example=example,
            pip_requirements=pip_requirements(),
            serialization_format="pt2",
            validate_serving_input=validate,
        )
        return time.perf_counter() - tic

    with mlflow.start_run(experiment_id=experiment):
        say(f"bench_log_model: first (cold) model {log('warm-up', True):.3f} s, not counted")
        for pair in range(pairs):
            # Alternate which goes first, so a slow spell does not always hit the same side.
            order = (True, False) if pair % 2 == 0 else (False, True)
            for validate in order:
                seconds[validate].append(log(f"m{pair}-{validate}", validate))
    return seconds


def main() -> None:
    args = parse_args()
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    at_start = load()
    with tempfile.TemporaryDirectory(prefix="deepopt-bench-log-model-") as root:
        seconds = measure(args.pairs, Path(root))
    differences = [on - off for on, off in zip(seconds[True], seconds[False], strict=True)]
    summary: dict[str, Any] = {
        "with_check_median_s": statistics.median(seconds[True]),
        "without_check_median_s": statistics.median(seconds[False]),
        "paired_difference_median_s": statistics.median(differences),
        "paired_difference_min_s": min(differences),
        "paired_difference_max_s": max(differences),
    }
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "started": started,
        "machine": {"cores": os.cpu_count()},
        "git_commit": commit or None,
        "load_average": {"start": at_start, "end": load()},
        "pairs": args.pairs,
        "seconds": {"with_check": seconds[True], "without_check": seconds[False]},
        **summary,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"log-model-{started}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    say(
        f"log_model with the serving check: median {summary['with_check_median_s']:.3f} s; "
        f"without: {summary['without_check_median_s']:.3f} s; paired difference median "
        f"{summary['paired_difference_median_s']:.3f} s "
        f"({summary['paired_difference_min_s']:.3f} to {summary['paired_difference_max_s']:.3f})"
        f" over {args.pairs} pairs"
    )
    say(f"bench_log_model: wrote {path}")


if __name__ == "__main__":
    main()
