#!/usr/bin/env python
"""How fast deepopt trains the lecture's BN-CNN on this CPU, measured against baselines.

Run from the repository root (the README shows the latest table and the command):

    .venv/bin/python benchmarks/bench_train.py                # everything, ~12 min on 2 cores
    .venv/bin/python benchmarks/bench_train.py --quick        # the epoch table only, ~1 min
    .venv/bin/python benchmarks/bench_train.py --only epoch,eval --epochs 7
    python benchmarks/bench_train.py --device cuda              # the GPU check (gpu_check.sh)

Sections (``--only``; default all): ``peak`` (fp32/bf16 matmul GFLOP/s), ``epoch`` (the
contenders below), ``eval`` (the 10,000 test images), ``speedrun`` (time to 91 % test
accuracy on the full Fashion-MNIST, ``benchmarks/speedrun.yaml``), ``scaling`` (epoch time
over training-set and batch size), ``cli`` (``deepopt --help``) and ``dvc`` (a no-op
``dvc repro`` of the real dvc.yaml in a scratch copy).

Contenders of ``epoch`` (``--contenders``), all on the same model (the lecture's BN-CNN,
``build_model``), the same data (the lecture's seeded 5,400 / 600 split), the same batch
size, optimizer (SGD 0.02 + Nesterov 0.9) and thread count:

  a  deepopt, its real stage code: ``training.member.train_tracked`` with MLflow (a store
     in a temp folder), per-epoch checkpoints and progress lines, fp32
  b  a bare PyTorch loop on preloaded tensors (the baseline)
  c  the pytorch/examples style: torchvision's dataset with per-item ToTensor/Normalize
     transforms through a DataLoader
  d  Keras 3 on the torch backend, the identical network and optimizer (if installed:
     ``pip install -e '.[bench]'``)
  e  deepopt's fastest configuration (``FAST_TRAIN``), also ``train_tracked`` with tracking
  f  (e)'s ``fit_member`` with ``torch.compile`` of the model: the steady epoch and the
     compile time
  g  (e) in the channels_last memory format: the layout choice, measured every run

One epoch = a pass over the training images plus an evaluation of the validation images
(every contender's fit reports val loss/accuracy per epoch, as the lecture's Keras fit).
Each contender runs in its own process and is released one epoch at a time: a warm-up epoch
each (imports, setup, kernel selection, compilation), then the timed epochs round robin
(a b c ... g a b c ...), so machine noise hits all alike. Medians are reported.

Compute efficiency = the model's training FLOPs (counted with torch.utils.flop_counter:
forward + backward per training image, forward per validation image) per second of epoch,
divided by the fp32 matmul peak measured in the same run.

The code is in benchmarks/bench/: the harness (processes, interleaving, medians, the
results JSON), the contenders, the sections and the rendering of the README table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import CONTENDERS, FAST_TRAIN, REPO, RESULTS_DIR, SECTIONS, SPEEDRUN_FILE

if TYPE_CHECKING:
    from deepopt.config import RunConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 timed epochs, only the epoch table (unless --only says more)",
    )
    parser.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument(
        "--contenders", default="abcdefg", help="letters of the contenders (default abcdefg)"
    )
    parser.add_argument(
        "--epochs", type=int, help="timed epochs per contender (default 5; quick 3)"
    )
    parser.add_argument(
        "--subset",
        type=int,
        default=None,
        help="training subset of the epoch/eval sections (default params: 6000)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--eval-images", type=int, default=None, help="test images of eval (default: all)"
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--speedrun", type=Path, default=SPEEDRUN_FILE)
    parser.add_argument("--speedrun-seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the JSON results")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default: the sections above) or cuda / cuda:N / mps: the GPU check of "
        "bench/gpu.py (deepopt vs a bare loop, the lecture epoch, the speedrun; no MLflow)",
    )
    args = parser.parse_args(argv)
    sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    if args.quick and not args.only:
        sections = ("peak", "epoch")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = sections
    args.contenders = [c for c in args.contenders.replace(",", "") if c]
    if any(c not in CONTENDERS for c in args.contenders):
        parser.error(f"--contenders: letters of {''.join(CONTENDERS)}")
    args.epochs = args.epochs or (3 if args.quick else 5)
    if args.epochs < 3:
        parser.error("--epochs: at least 3 (the table shows medians)")
    args.eval_rounds = 3 if args.quick else 7
    args.eval_batches = [1000] if args.quick else [250, 1000, 2500, 10000]
    args.scaling_epochs = 3
    args.scaling_precisions = ["fp32", FAST_TRAIN["precision"]]
    args.sizes = [args.subset or 6000] if args.quick else [6000, 30000, None]
    args.batches = [50, 512] if args.quick else [50, 128, 256, 512]
    args.cli_runs = 3 if args.quick else 7
    args.dvc_runs = 3
    return args


def base_config(args: argparse.Namespace) -> RunConfig:
    """params.yaml's base run, without early stopping (every contender runs every epoch)."""
    from deepopt.config import apply_overrides, load_params

    params = load_params(args.params)
    overrides: dict[str, Any] = {
        "early_stop": {"enabled": False},
        "mlflow": {"experiment": "bench", "log_model": False},
    }
    if args.subset is not None:
        overrides["data"] = {"train_subset": args.subset}
    return apply_overrides(params.base_run(), overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu":
        from bench.gpu import run

        return run(args, base_config(args))
    # Imported here: ``--help`` needs neither torch nor deepopt.
    import os
    import time
    from datetime import UTC, datetime

    import torch
    from bench.common import BenchError, load, say
    from bench.data import Setup, build_data
    from bench.harness import Bench, machine, scratch, write_results
    from bench.render import markdown, targets
    from bench.sections import SECTION_FUNCTIONS, section_peak

    from deepopt import tracking

    threads = args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    started = datetime.now(UTC)
    config = base_config(args)
    say(
        f"deepopt benchmark: sections {','.join(args.sections)}; {threads} threads; "
        f"torch {torch.__version__}; load {load()}"
    )
    results: dict[str, Any] = {
        "command": " ".join(
            ["benchmarks/bench_train.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(threads),
        "load_start": load(),
    }
    with scratch(keep=False) as workdir:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
        tracking.configure(workdir)
        experiment_id = tracking.ensure_experiment(config.mlflow.experiment)
        data = build_data(config, config.data.train_subset)
        bench = Bench(args, Setup(config, data, workdir, experiment_id))
        for name in args.sections:
            say(f"== {name} (load {load()})")
            tic = time.perf_counter()
            try:
                results[name] = SECTION_FUNCTIONS[name](bench)
            except BenchError as err:  # the other sections still run; the table says why
                results.setdefault("errors", {})[name] = str(err)
                say(f"  {name} FAILED: {err}")
                continue
            results[name]["section_s"] = time.perf_counter() - tic
        if "peak" in results and "epoch" in results:
            # A second peak measurement: the better of the two is the machine's peak.
            again = section_peak(bench)
            for key, value in again.items():
                results["peak"][key] = max(results["peak"][key], value)
    results["load_end"] = load()
    results["targets"] = targets(results, config.train.precision)
    table = markdown(results)
    results["markdown"] = table
    say(
        "\n" + table + f"\n\nload average (1/5/15 min) at start {results['load_start']}, "
        f"at end {results['load_end']}"
    )
    target = write_results(results, args.out, started)
    say(f"results: {target}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
