"""The rendering: the performance targets checked against a run's numbers, and the
markdown tables the README shows."""

from __future__ import annotations

import statistics
from typing import Any

from .common import SPEEDRUN_ACCURACY, TARGETS_TEXT


def bf16_accuracy_gap(speedrun: dict[str, Any]) -> float | None:
    """Mean test-accuracy difference (points) of the speedrun's runs minus fp32's, seed by
    seed; None without fp32 runs."""
    pairs = zip(speedrun["runs"], speedrun.get("fp32_references") or [], strict=False)
    gaps = [(fast["test_acc"] - fp32["test_acc"]) * 100 for fast, fp32 in pairs]
    return statistics.mean(gaps) if gaps else None


def targets(results: dict[str, Any], stage_precision: str) -> list[dict[str, Any]]:
    """Each target of the performance issue against this run's numbers; ``stage_precision``
    is params.yaml's train.precision, the one the evaluate stage runs in."""
    checks: list[dict[str, Any]] = []

    def add(key: str, value: float | None, limit: float, higher: bool, unit: str) -> None:
        if value is None:
            return
        met = value >= limit if higher else value < limit
        checks.append(
            {"target": TARGETS_TEXT[key], "value": value, "limit": limit, "unit": unit, "met": met}
        )

    rows = results.get("epoch", {}).get("contenders", {})

    def speed(a: str, b: str) -> float | None:
        return rows[b]["median_s"] / rows[a]["median_s"] if a in rows and b in rows else None

    add("a_vs_b", speed("a", "b"), 0.95, True, "x")
    add("a_vs_d", speed("a", "d"), 1.8, True, "x")
    add("e_vs_b", speed("e", "b"), 1.4, True, "x")
    speedrun = results.get("speedrun")
    gap = bf16_accuracy_gap(speedrun) if speedrun else None
    if gap is not None:
        add("e_accuracy", abs(gap), 0.3, False, "points")
    if speedrun:
        add("speedrun", min(r["test_acc"] for r in speedrun["runs"]), SPEEDRUN_ACCURACY, True, "")
    evaluation = results.get("eval")
    if evaluation:
        # The evaluate stage's own path with params.yaml's precision: channels_last,
        # train.eval_batch_size (1000).
        stage = [
            r
            for r in evaluation["rows"]
            if r["precision"] == stage_precision
            and r["layout"] == "channels_last"
            and r["batch_size"] == 1000
            and r["images"] == 10_000
        ]
        if stage:
            add("eval", stage[0]["median_s"], 0.5, False, "s")
    if "cli" in results:
        add("help", results["cli"]["help_median_s"], 0.3, False, "s")
    if "dvc" in results:
        add("dvc", results["dvc"]["noop_median_s"], 3.0, False, "s")
    return checks


def scaling_tables(rows: list[dict[str, Any]]) -> list[str]:
    """Epoch seconds (samples/s) by training-set size and by batch size, per precision."""
    cell = {(r["train_images"], r["batch_size"], r["precision"]): r for r in rows}
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    sizes = sorted({r["train_images"] for r in rows if r["kind"] == "size"})
    batches = sorted({r["batch_size"] for r in rows})
    base_images = next((r["train_images"] for r in rows if r["kind"] == "batch"), None)
    base_batch = next((r["batch_size"] for r in rows if r["kind"] == "size"), None)
    head = " | ".join(f"{p} epoch s (samples/s)" for p in precisions)
    line = " | ".join("---" for _ in precisions)

    def cells(images: int, batch: int) -> str:
        found = [cell.get((images, batch, p)) for p in precisions]
        return " | ".join(
            f"{r['median_s']:.3f} ({r['samples_per_s']:,.0f})" if r else "-" for r in found
        )

    lines = ["", f"| train images (batch {base_batch}) | {head} |", f"| --- | {line} |"]
    lines += [f"| {images:,} | {cells(images, base_batch or 0)} |" for images in sizes]
    if base_images is not None:
        lines += ["", f"| batch ({base_images:,} images) | {head} |", f"| --- | {line} |"]
        lines += [f"| {batch} | {cells(base_images, batch)} |" for batch in batches]
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    peak = results.get("peak", {}).get("fp32_gflops")
    epoch = results.get("epoch")
    if epoch:
        rows = epoch["contenders"]
        base = rows.get("b", {}).get("median_s")
        lines += [
            f"Epoch = {epoch['train_images']:,} training images (batch {epoch['batch_size']}) "
            f"+ {epoch['val_images']:,} validation images; median of "
            f"{len(next(iter(rows.values()))['epochs_s'])} interleaved epochs after a warm-up.",
            "",
            "| contender | epoch s (median) | min-max | samples/s | vs (b) | GFLOP/s | "
            "efficiency (of fp32 peak) | test acc |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key, row in rows.items():
            ratio = f"{base / row['median_s']:.2f}x" if base else "-"
            efficiency = f"{row['gflops'] / peak:.0%}" if peak else "-"
            acc = f"{row['test_acc']:.4f}" if row.get("test_acc") is not None else "-"
            lines.append(
                f"| ({key}) {row['name']} | {row['median_s']:.3f} | {min(row['epochs_s']):.3f}-"
                f"{max(row['epochs_s']):.3f} | {row['samples_per_s']:,.0f} | {ratio} | "
                f"{row['gflops']:.0f} | {efficiency} | {acc} |"
            )
        if "f" in rows:
            lines.append("")
            lines.append(
                f"torch.compile: first epoch {rows['f']['warmup_s']:.1f} s, of which "
                f"~{rows['f']['compile_s']:.1f} s compiling."
            )
    if results.get("peak"):
        p = results["peak"]
        lines += [
            "",
            f"Matmul peak in this run: fp32 {p['fp32_gflops']:.0f} GFLOP/s, "
            f"bf16 {p['bf16_gflops']:.0f} GFLOP/s.",
        ]
    if results.get("eval"):
        rows = results["eval"]["rows"]
        layouts = list(dict.fromkeys(r["layout"] for r in rows))
        cell = {(r["precision"], r["layout"], r["batch_size"]): r["median_s"] for r in rows}
        lines += [
            "",
            f"| evaluate {rows[0]['images']:,} test images: precision, batch | "
            + " | ".join(f"{layout} s" for layout in layouts)
            + " |",
            "| --- | " + " | ".join("---" for _ in layouts) + " |",
        ]
        for precision, batch in dict.fromkeys((r["precision"], r["batch_size"]) for r in rows):
            times = " | ".join(f"{cell[(precision, lay, batch)]:.3f}" for lay in layouts)
            lines.append(f"| {precision}, {batch} | {times} |")
    if results.get("speedrun"):
        s = results["speedrun"]
        per_seed = ", ".join(f"{r['wall_s']:.1f} s / {r['test_acc']:.4f}" for r in s["runs"])
        lines += [
            "",
            f"Speedrun ({s['train_images']:,} training images, "
            f"benchmarks/speedrun.yaml): median {s['median_wall_s']:.1f} s wall to "
            f"test acc {s['median_test_acc']:.4f} over seeds "
            f"{', '.join(str(r['seed']) for r in s['runs'])} "
            f"({per_seed}).",
        ]
        if s.get("fp32_references"):
            fp32 = ", ".join(
                f"{r['seed']}: {r['wall_s']:.1f} s / {r['test_acc']:.4f}"
                for r in s["fp32_references"]
            )
            lines.append(
                f"The same in fp32: {fp32}; bf16 minus fp32, mean over the seeds: "
                f"{bf16_accuracy_gap(s):+.2f} points of test accuracy."
            )
    if results.get("scaling"):
        lines += scaling_tables(results["scaling"]["rows"])
    if results.get("cli") or results.get("dvc"):
        lines.append("")
    if results.get("cli"):
        lines.append(f"`deepopt --help`: {results['cli']['help_median_s']:.3f} s (median).")
    if results.get("dvc"):
        lines.append(
            f"No-op `dvc repro` ({results['dvc']['stages']} stages of dvc.yaml): "
            f"{results['dvc']['noop_median_s']:.2f} s (median)."
        )
    for name, error in results.get("errors", {}).items():
        lines += ["", f"Section {name} failed: {error}"]
    checks = results.get("targets", [])
    if checks:
        lines += ["", "| target | value | met |", "| --- | --- | --- |"]
        for c in checks:
            lines.append(
                f"| {c['target']} | {c['value']:.3f} {c['unit']} | {'yes' if c['met'] else 'NO'} |"
            )
    return "\n".join(lines)
