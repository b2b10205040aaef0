"""Transfer learning: disjoint class tasks, nested few-shot sets per seed, frozen backbones,
the modes' param groups, and a tiny pretrain -> finetune chain over two seeds end to end
(the report's table and claim: test_transfer_report.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from deepopt import cli, paths
from deepopt.config import ModelConfig, parse_params
from deepopt.config.limits import MAX_REPLICAS
from deepopt.data import RawData, Split
from deepopt.errors import ConfigError
from deepopt.models import build_model
from deepopt.transfer import (
    FrozenBatchNorm,
    few_shot,
    finetune_repeats,
    load_backbone,
    load_task,
    make_task,
    param_groups,
    seeded_pool,
    select_classes,
    split_digest,
)

REPO = Path(__file__).resolve().parents[2]
SMALL_CNN = ModelConfig(conv_channels=(4, 8, 8), dense_units=16)


def _raw(per_class: int = 25, test_per_class: int = 5) -> RawData:
    """Images whose every pixel is the image's index (< 256): where an image went shows."""
    n, m = 10 * per_class, 10 * test_per_class
    index = torch.arange(n, dtype=torch.int64)
    images = (index % 256).to(torch.uint8)[:, None, None].expand(n, 28, 28).clone()
    test = torch.zeros(m, 28, 28, dtype=torch.uint8)
    return RawData(
        train_images=images,
        train_labels=(index % 10).to(torch.uint8),
        test_images=test,
        test_labels=(torch.arange(m) % 10).to(torch.uint8),
    )


def _task(raw: RawData, classes: tuple[int, ...], train: int | None = 12, val: int = 4) -> Any:
    return make_task(
        raw,
        dataset="fashion-mnist",
        classes=classes,
        class_names=[str(c) for c in range(10)],
        train_per_class=train,
        val_per_class=val,
        seed=7,
        key="transfer.source",
    )


# ---------------------------------------------------------------------------------------
# tasks and few-shot sets


def test_select_classes_relabels_in_the_listed_order_and_keeps_file_order() -> None:
    labels = torch.tensor([3, 5, 9, 5, 3, 1], dtype=torch.uint8)
    images = torch.arange(6, dtype=torch.uint8)[:, None, None].expand(6, 2, 2)
    split = select_classes(images, labels, (5, 3))
    assert split.labels.tolist() == [1, 0, 0, 1]  # 3 -> 1, 5 -> 0, 5 -> 0, 3 -> 1
    assert split.images[:, 0, 0].tolist() == [0, 1, 3, 4]


def test_source_and_target_share_no_class_and_no_image() -> None:
    raw = _raw()
    source, target = _task(raw, (0, 1, 2, 3, 4)), _task(raw, (5, 6, 7, 8, 9))

    def original_classes(split: Split) -> set[int]:
        return {int(i) % 10 for i in split.images[:, 0, 0]}  # pixel = index, label = index % 10

    for part in ("train", "val"):
        assert original_classes(getattr(source, part)) == {0, 1, 2, 3, 4}
        assert original_classes(getattr(target, part)) == {5, 6, 7, 8, 9}
    seen = [set(s.images[:, 0, 0].tolist()) for t in (source, target) for s in (t.train, t.val)]
    assert sum(len(s) for s in seen) == len(set().union(*seen))  # no image twice
    assert target.class_names == ["5", "6", "7", "8", "9"]
    assert target.test.labels.tolist().count(0) == 5  # all test images of class 5


def test_overlapping_classes_of_one_dataset_are_refused_in_one_line() -> None:
    overlap = {"transfer": {"target": {"dataset": "fashion-mnist", "classes": [4, 5, 6]}}}
    with pytest.raises(ConfigError, match=r"transfer\.target\.classes: \[4\] are also source"):
        parse_params(overlap)
    other_dataset = {"transfer": {"target": {"dataset": "mnist", "classes": [0, 1, 2, 3, 4]}}}
    assert parse_params(other_dataset).transfer.target.dataset == "mnist"


def test_few_shot_sets_are_per_class_and_nested() -> None:
    task = _task(_raw(), (5, 6, 7), train=10)
    small, large = few_shot(task.train, 2, 3), few_shot(task.train, 6, 3)
    assert torch.bincount(small.labels, minlength=3).tolist() == [2, 2, 2]
    assert torch.bincount(large.labels, minlength=3).tolist() == [6, 6, 6]
    assert set(small.images[:, 0, 0].tolist()) < set(large.images[:, 0, 0].tolist())
    assert set(task.val.images[:, 0, 0].tolist()).isdisjoint(task.train.images[:, 0, 0].tolist())
    with pytest.raises(ConfigError, match=r"transfer\.target_sizes: 11 per class is more"):
        few_shot(task.train, 11, 3)


def test_a_seed_draws_its_own_nested_labelled_sets_from_the_pool() -> None:
    task = _task(_raw(), (5, 6, 7), train=20)
    first, again, other = (seeded_pool(task.train, 3, seed) for seed in (4487, 4487, 4488))
    assert torch.equal(first.images, again.images)  # a seed always draws the same images

    def pixels(split: Split, per_class: int) -> list[int]:
        return few_shot(split, per_class, 3).images[:, 0, 0].tolist()

    assert set(pixels(first, 2)) < set(pixels(first, 6))  # nested within a seed
    assert set(pixels(first, 6)) != set(pixels(other, 6))  # another seed, other images
    assert torch.bincount(few_shot(other, 6, 3).labels, minlength=3).tolist() == [6, 6, 6]
    assert sorted(pixels(first, 20)) == sorted(task.train.images[:, 0, 0].tolist())
    assert split_digest(few_shot(first, 6, 3)) != split_digest(few_shot(other, 6, 3))


@pytest.mark.parametrize("seeds", [0, MAX_REPLICAS + 1, "three", 2.5])
def test_a_bad_transfer_seeds_is_a_one_line_config_error(seeds: object) -> None:
    pattern = rf"^params\.yaml: transfer\.seeds: .+ <= {MAX_REPLICAS}$"
    with pytest.raises(ConfigError, match=pattern) as err:
        parse_params({"transfer": {"seeds": seeds}})
    assert "\n" not in str(err.value)
    assert parse_params({}).transfer.seeds == 3


def test_a_task_needing_more_images_than_a_class_has_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"transfer\.source: a class of fashion-mnist has only"):
        _task(_raw(per_class=10), (0, 1), train=8, val=4)


def test_small_sets_are_repeated_to_fill_an_epoch() -> None:
    assert finetune_repeats(50, 50, 30) == 30
    assert finetune_repeats(1000, 50, 30) == 2
    assert finetune_repeats(5000, 50, 30) == 1


# ---------------------------------------------------------------------------------------
# the modes


def _step(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.arange(8) % 3)
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()


def test_linear_probe_changes_the_head_and_nothing_else() -> None:
    torch.manual_seed(0)
    model = build_model(SMALL_CNN, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, param_groups(model, "linear_probe", 0.1, 0.1))
    after = model.state_dict()
    assert before.keys() == after.keys()  # the frozen network still saves as the plain one
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"logits.weight", "logits.bias"}  # BN statistics included: unchanged
    assert isinstance(model.bn1, FrozenBatchNorm)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "logits.weight",
        "logits.bias",
    ]


def test_finetune_trains_every_layer_with_a_lower_backbone_rate() -> None:
    model = build_model(SMALL_CNN, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = param_groups(model, "finetune", 0.1, 0.25)
    assert [g.get("lr") for g in groups] == [None, pytest.approx(0.025)]  # head: optim.lr
    assert [id(p) for p in groups[0]["params"]] == [id(model.logits.weight), id(model.logits.bias)]
    _step(model, groups)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    scratch = param_groups(build_model(SMALL_CNN, num_classes=3), "scratch", 0.1, 0.25)
    assert all("lr" not in g for g in scratch)


def test_frozen_batchnorm_normalizes_like_batchnorm_in_eval_mode() -> None:
    norm = nn.BatchNorm2d(3)
    norm.train()(torch.randn(16, 3, 4, 4) * 3 + 1)  # some running statistics
    with torch.no_grad():
        norm.weight.uniform_(), norm.bias.uniform_()
    frozen = FrozenBatchNorm(norm).train()  # training mode changes nothing
    x = torch.randn(5, 3, 4, 4)
    assert torch.allclose(frozen(x), norm.eval()(x))
    assert frozen.state_dict().keys() == norm.state_dict().keys()


def test_load_backbone_keeps_a_new_head_even_of_the_same_size() -> None:
    torch.manual_seed(0)
    source = build_model(SMALL_CNN, num_classes=5)
    torch.manual_seed(1)
    target = build_model(SMALL_CNN, num_classes=5)
    head = target.logits.weight.clone()
    load_backbone(target, source.state_dict(), "pretrain.pt")
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert torch.equal(target.bn4.running_var, source.bn4.running_var)
    assert torch.equal(target.logits.weight, head)
    other = build_model(ModelConfig(conv_channels=(4, 8, 9), dense_units=16), num_classes=5)
    with pytest.raises(ConfigError, match=r"pretrain\.pt: the pretrained weights do not fit"):
        load_backbone(other, source.state_dict(), "pretrain.pt")


def test_scratch_starts_from_random_weights_even_if_pretraining_started_from_a_file() -> None:
    from deepopt.transfer.runs import finetune_config, pretrain_config

    params = parse_params({"transfer": {"overrides": {"model": {"weights": "start.pt"}}}})
    assert pretrain_config(params).model.weights == "start.pt"
    finetune = finetune_config(params)
    assert finetune.model.weights is None
    assert finetune.data.name == "fashion-mnist" and not finetune.early_stop.enabled
    assert finetune.train.epochs == params.transfer.finetune_epochs


# ---------------------------------------------------------------------------------------
# the pipeline


def test_transfer_dvc_yaml_writes_the_paths_the_code_writes() -> None:
    with open(REPO / "transfer" / "dvc.yaml", encoding="utf-8") as handle:
        stages = yaml.safe_load(handle)["stages"]

    def names(stage: dict[str, Any], key: str) -> set[str]:
        return {e if isinstance(e, str) else next(iter(e)) for e in stage.get(key, [])}

    assert {stages[s]["wdir"] for s in stages} == {".."}
    assert names(stages["pretrain"], "outs") == {str(paths.transfer_model_path())}
    assert names(stages["pretrain"], "metrics") == {str(paths.transfer_metrics_path("pretrain"))}
    assert str(paths.transfer_model_path()) in stages["finetune"]["deps"]
    assert names(stages["finetune"], "metrics") == {str(paths.transfer_metrics_path("finetune"))}
    assert names(stages["finetune"], "outs") == {
        str(paths.transfer_report_path()),
        str(paths.transfer_plot_path()),
    }
    for stage in stages.values():  # nothing the main pipeline's report reads as a folder
        for out in names(stage, "outs") | names(stage, "metrics"):
            assert out.startswith("transfer/")


@pytest.mark.slow
def test_make_repro_does_not_run_the_transfer_stages() -> None:
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    listed = subprocess.run(
        [dvc, "stage", "list", "--name-only"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "prepare" in listed and not any("pretrain" in s or "finetune" in s for s in listed)
    transfer = subprocess.run(
        [dvc, "stage", "list", "--name-only", "transfer/dvc.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert transfer == ["transfer/dvc.yaml:pretrain", "transfer/dvc.yaml:finetune"]


@pytest.mark.slow
def test_pretrain_then_finetune_over_two_seeds_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_params: dict[str, Any]
) -> None:
    from deepopt import tracking

    params = {
        **base_params,
        "model": {**base_params["model"], "conv_channels": [4, 8, 8], "dense_units": 16},
        "train": {**base_params["train"], "threads": 1},
        "transfer": {
            "source_per_class": 40,
            "val_per_class": 10,
            "target_sizes": [2, 6],
            "seeds": 2,
            "pretrain_epochs": 2,
            "finetune_epochs": 2,
            "finetune_min_batches": 2,
            "overrides": {"mlflow": {"log_model": False}},
        },
    }
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert cli.main(["pretrain"]) == 0
    assert cli.main(["finetune"]) == 0
    pretrained = torch.load(paths.transfer_model_path(), weights_only=True)
    assert pretrained["num_classes"] == 5 and pretrained["classes"] == [0, 1, 2, 3, 4]
    summary = json.loads(paths.transfer_metrics_path("finetune").read_text())
    seed = params["seed"]
    assert summary["seeds"] == [seed, seed + 1]
    modes = ("linear_probe", "finetune", "scratch")
    cells = [(r["mode"], r["per_class"], r["seed"]) for r in summary["runs"]]
    assert sorted(cells) == sorted(
        (m, s, k) for m in modes for s in (2, 6) for k in (seed, seed + 1)
    )
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in summary["runs"])
    assert summary["target"]["test_images"] == 5000  # every test image of classes 5-9
    # One seed's modes learn from the same labelled images, the seed's own draw of the pool.
    parsed = parse_params(params)
    task = load_task(
        parsed.transfer.target,
        root=Path(parsed.data.root),
        train_per_class=None,
        val_per_class=10,
        seed=seed,
        key="transfer.target",
    )
    drawn = {
        (s, k): split_digest(few_shot(seeded_pool(task.train, 5, k), s, 5))
        for s in (2, 6)
        for k in (seed, seed + 1)
    }
    assert len(set(drawn.values())) == 4  # another seed or size, other images
    for run in summary["runs"]:
        assert run["train_digest"] == drawn[(run["per_class"], run["seed"])], run
    report = paths.transfer_report_path().read_text()
    assert "| 2 |" in report and "| 6 |" in report and "(n = 2)" in report
    assert "| a pretrained backbone helps most when labels are few | fine-tune |" in report
    assert paths.transfer_plot_path().read_bytes().startswith(b"\x89PNG")
    # Every fine-tune is its own run, named by mode, size and seed, tagged with (and nested
    # under) the pretrain run.
    client = tracking.store._client()
    names = set()
    for entry in summary["runs"]:
        run = client.get_run(entry["run_id"])
        names.add(run.info.run_name)
        assert (
            run.info.run_name == f"{entry['mode']} size={entry['per_class']} seed={entry['seed']}"
        )
        assert run.data.tags["seed"] == str(entry["seed"])
        assert run.data.tags["replica"] == str(entry["seed"] - seed)
        assert run.data.tags["source_run_id"] == pretrained["run_id"]
        assert run.data.tags["mlflow.parentRunId"] == pretrained["run_id"]
        assert run.data.tags["transfer_mode"] == entry["mode"]
        assert run.data.metrics["test_acc"] == pytest.approx(entry["test_acc"])
    assert len(names) == len(summary["runs"]) == 12
    # A second run reuses every finished checkpoint: the same runs, the same accuracies.
    assert cli.main(["finetune"]) == 0
    again = json.loads(paths.transfer_metrics_path("finetune").read_text())
    assert [r["run_id"] for r in again["runs"]] == [r["run_id"] for r in summary["runs"]]
    assert [r["test_acc"] for r in again["runs"]] == [r["test_acc"] for r in summary["runs"]]
    # Another backbone learning rate trains the fine-tunes anew, and only them.
    params["transfer"]["backbone_lr_scale"] = 0.5
    Path("params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert cli.main(["finetune"]) == 0
    third = json.loads(paths.transfer_metrics_path("finetune").read_text())
    for old, new in zip(summary["runs"], third["runs"], strict=True):
        assert (old["run_id"] != new["run_id"]) == (old["mode"] == "finetune"), old["mode"]
