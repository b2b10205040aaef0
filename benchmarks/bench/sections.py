"""The benchmark's sections but ``dvc``: the matmul peak, the epoch table, evaluation,
the speedrun, scaling over data and batch size, and ``deepopt --help``."""

from __future__ import annotations

import copy
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from deepopt import paths
from deepopt.config import RunConfig, apply_overrides
from deepopt.models import build_model, evaluation_layout
from deepopt.training import evaluate_logits
from deepopt.training.member import Member, normalized_splits, train_tracked

from .common import CONTENDERS, load, say
from .data import BenchData, build_data, test_accuracy, test_tensors
from .dvc_section import section_dvc
from .flops import epoch_flops, matmul_gflops, model_flops
from .harness import Bench, Spec, interleave
from .keras_contender import keras_available


def section_peak(bench: Bench) -> dict[str, Any]:
    fp32 = max(matmul_gflops(torch.float32) for _ in range(2))
    bf16 = max(matmul_gflops(torch.bfloat16) for _ in range(2))
    say(f"peak: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s (load {load()})")
    return {"fp32_gflops": fp32, "bf16_gflops": bf16}


def section_epoch(bench: Bench) -> dict[str, Any]:
    keys = list(bench.args.contenders)
    if "d" in keys and not keras_available():
        say("  (d) skipped: keras is not installed (pip install -e '.[bench]')")
        keys.remove("d")
    timings = interleave(
        {key: bench.spec(key, bench.args.epochs) for key in keys}, bench.args.epochs, "epoch"
    )
    prepared = bench.data.prepared
    flops = model_flops(bench.setup.config.model, (1, 28, 28))
    per_epoch = epoch_flops(flops, bench.data.train_count, int(prepared.val.labels.shape[0]))
    rows: dict[str, Any] = {}
    for key, timing in timings.items():
        rows[key] = {
            "name": CONTENDERS[key],
            **timing.to_dict(),
            "samples_per_s": bench.data.train_count / timing.median,
            "gflops": per_epoch / timing.median / 1e9,
            "test_acc": timing.result.get("test_acc"),
            "val_acc": timing.result.get("val_acc"),
        }
    if "f" in rows:
        # The first epoch of (f) also compiles: its excess over a steady epoch.
        rows["f"]["compile_s"] = rows["f"]["warmup_s"] - rows["f"]["median_s"]
    return {
        "train_images": bench.data.train_count,
        "val_images": int(prepared.val.labels.shape[0]),
        "batch_size": bench.setup.batch_size,
        "flops_per_image": flops,
        "flops_per_epoch": per_epoch,
        "contenders": rows,
    }


def section_eval(bench: Bench) -> dict[str, Any]:
    """The test images through ``evaluate_logits`` (inference_mode, eval batches), per
    precision, memory layout (channels_last: as the evaluate stage runs it) and batch."""
    prepared = bench.data.prepared
    combos = [
        (precision, layout, batch)
        for precision in ("fp32", "bf16")
        for layout in ("channels_last", "nchw")
        for batch in bench.args.eval_batches
    ]
    torch.manual_seed(0)
    model = build_model(bench.setup.config.model).eval()
    images = test_tensors(prepared, channels_last=False)[0][: bench.args.eval_images]
    # channels_last: the evaluate stage's own layout (models.layout); nchw: the alternative.
    stage_model, stage_images = evaluation_layout(copy.deepcopy(model), images)
    inputs = {"nchw": images, "channels_last": stage_images}
    models = {"nchw": model, "channels_last": stage_model}
    times: dict[tuple[str, str, int], list[float]] = {combo: [] for combo in combos}
    for precision, layout, batch in combos:  # warm-up: oneDNN picks and caches its kernels
        evaluate_logits(models[layout], inputs[layout], batch, precision)
    for _ in range(bench.args.eval_rounds):
        for combo in combos:
            precision, layout, batch = combo
            tic = time.perf_counter()
            evaluate_logits(models[layout], inputs[layout], batch, precision)
            times[combo].append(time.perf_counter() - tic)
    rows = [
        {
            "precision": precision,
            "layout": layout,
            "batch_size": batch,
            "median_s": statistics.median(times[(precision, layout, batch)]),
            "runs_s": times[(precision, layout, batch)],
            "images": len(inputs[layout]),
        }
        for precision, layout, batch in combos
    ]
    for row in rows:
        say(
            f"  eval {row['precision']} {row['layout']} batch {row['batch_size']}: "
            f"{row['median_s']:.3f} s"
        )
    return {"rows": rows, "load": load()}


def speedrun_config(base: RunConfig, path: Path) -> RunConfig:
    with open(path, encoding="utf-8") as handle:
        overrides = yaml.safe_load(handle) or {}
    return apply_overrides(base, overrides, prefix=path.name)


def timed_tracked_run(
    bench: Bench, config: RunConfig, data: BenchData, name: str, seed: int
) -> dict[str, Any]:
    """One deepopt run, start to end (MLflow run, checkpoints, final logging), then test."""
    tic = time.perf_counter()
    tensors = normalized_splits(data.prepared)
    result = train_tracked(
        config,
        tensors,
        data_meta=data.prepared.meta,
        experiment_id=bench.setup.experiment_id,
        run_name=name,
        member=Member(replica=seed - config.seed, index=0, seed=seed),
        checkpoint_dir=paths.checkpoint_dir(bench.setup.workdir / "checkpoints", f"{name}-{seed}"),
    )
    accuracy = test_accuracy(result.model, data.prepared, config.train.precision)
    wall = time.perf_counter() - tic
    history = result.fit.history
    say(
        f"  [{name}] seed {seed}: {wall:.1f} s, {result.fit.epochs_run} epochs, "
        f"val_acc {history[-1]['val_acc']:.4f}, test_acc {accuracy:.4f} (load {load()})"
    )
    return {
        "seed": seed,
        "wall_s": wall,
        "train_s": result.fit.train_seconds,
        "epochs": result.fit.epochs_run,
        "val_acc": history[-1]["val_acc"],
        "test_acc": accuracy,
        "val_acc_per_epoch": [r["val_acc"] for r in history],
    }


def section_speedrun(bench: Bench) -> dict[str, Any]:
    """benchmarks/speedrun.yaml on its data, seeds seed..seed+n-1, and the same in fp32.

    The fp32 runs use the same seeds: bf16's accuracy cost is the mean of the per-seed
    differences, since one pair alone differs by up to ~0.3 points from float rounding
    (the fp32 run of seed 4487 gave 0.9105 and 0.9090 with two convolution layouts).
    """
    config = speedrun_config(bench.setup.config, bench.args.speedrun)
    data = build_data(config, config.data.train_subset)
    seeds = [config.seed + r for r in range(bench.args.speedrun_seeds)]
    runs = [timed_tracked_run(bench, config, data, "speedrun", seed) for seed in seeds]
    references = []
    if config.train.precision != "fp32" and not bench.args.quick:
        fp32 = apply_overrides(config, {"train": {"precision": "fp32"}})
        references = [timed_tracked_run(bench, fp32, data, "speedrun-fp32", s) for s in seeds]
    return {
        "config": config.model_dump(mode="json"),
        "train_images": data.train_count,
        "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_test_acc": statistics.median(r["test_acc"] for r in runs),
        "fp32_references": references,
    }


def section_scaling(bench: Bench) -> dict[str, Any]:
    """deepopt's epoch time over training-set size (batch 50) and batch size (5,400 images)."""
    setup, args = bench.setup, bench.args
    precisions = args.scaling_precisions
    rows: list[dict[str, Any]] = []
    datasets = {
        subset: (
            setup.data
            if subset == setup.config.data.train_subset
            else build_data(setup.config, subset)
        )
        for subset in args.sizes
    }
    specs: dict[str, Spec] = {}
    meta: dict[str, dict[str, Any]] = {}
    epochs = args.scaling_epochs
    for precision in precisions:
        for subset, data in datasets.items():
            key = f"size {subset or 60000} {precision}"
            specs[key] = bench.spec(
                "deepopt",
                epochs,
                subset=subset,
                train={"precision": precision},
                run_name=f"scaling-{subset}-{precision}",
            )
            meta[key] = {
                "kind": "size",
                "subset": subset,
                "train_images": data.train_count,
                "batch_size": setup.batch_size,
                "precision": precision,
            }
        for batch in args.batches:
            key = f"batch {batch} {precision}"
            if batch == setup.batch_size and setup.config.data.train_subset in datasets:
                continue  # the size row of the benchmark's own subset is this row
            specs[key] = bench.spec(
                "deepopt",
                epochs,
                train={"precision": precision, "batch_size": batch},
                run_name=f"scaling-b{batch}-{precision}",
            )
            meta[key] = {
                "kind": "batch",
                "subset": setup.config.data.train_subset,
                "train_images": setup.data.train_count,
                "batch_size": batch,
                "precision": precision,
            }
    timings = interleave(specs, epochs, "scaling")
    for key, timing in timings.items():
        rows.append(
            {
                "key": key,
                **meta[key],
                **timing.to_dict(),
                "samples_per_s": meta[key]["train_images"] / timing.median,
            }
        )
    return {"rows": rows}


def section_cli(bench: Bench) -> dict[str, Any]:
    """Wall time of ``deepopt --help`` and which heavy modules its import pulls in."""
    exe = shutil.which("deepopt", path=str(Path(sys.executable).parent)) or "deepopt"
    times = []
    for _ in range(bench.args.cli_runs):
        tic = time.perf_counter()
        subprocess.run([exe, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - tic)
    probe = (
        "import sys, contextlib, io\n"
        "from deepopt import cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help'])\n"
        "print(','.join(m for m in ('torch', 'mlflow', 'optuna', 'dvc') if m in sys.modules))\n"
    )
    heavy = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.strip()
    median = statistics.median(times)
    say(
        f"  deepopt --help: {median:.3f} s median of {len(times)}; heavy imports: {heavy or 'none'}"
    )
    return {
        "help_median_s": median,
        "help_runs_s": times,
        "heavy_imports": heavy.split(",") if heavy else [],
    }


SECTION_FUNCTIONS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "peak": section_peak,
    "epoch": section_epoch,
    "eval": section_eval,
    "speedrun": section_speedrun,
    "scaling": section_scaling,
    "cli": section_cli,
    "dvc": section_dvc,
}
