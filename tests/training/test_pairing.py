"""Seeds pair experiments: replica r of every experiment sees the same data order and, with
the same network, starts from the same weights (what the report's paired tests rely on)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepopt.config import EarlyStopConfig, OptimConfig, RunConfig, ScheduleConfig
from deepopt.config.limits import MAX_REPLICAS
from deepopt.optim import build_optimizer, build_schedule
from deepopt.training import fit
from deepopt.training.member import initial_model
from deepopt.training.seeds import members_of
from tiny_data import gaussian_blobs

_META = {"num_classes": 10}


def _config(**sections: object) -> RunConfig:
    return RunConfig.model_validate(sections)


def _tensors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": gaussian_blobs(60, 1, size=28), "val": gaussian_blobs(20, 2, size=28)}


def test_replica_r_starts_from_seed_plus_r_whatever_the_ensemble() -> None:
    single = members_of(_config(seed=10), 3)
    ensemble = members_of(_config(seed=10, train={"ensemble": 4}), 3)
    assert [m.seed for m in single] == [10, 11, 12]
    assert [m.seed for m in ensemble if m.index == 0] == [10, 11, 12]
    seeds = [m.seed for m in ensemble]
    assert len(set(seeds)) == len(seeds) == 12  # no two networks share a seed
    later_members = set(seeds) - {10, 11, 12}
    assert not later_members & {10 + r for r in range(MAX_REPLICAS)}  # no replica's seed
    assert [(m.replica, m.index) for m in ensemble[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]


def test_the_same_network_starts_from_the_same_weights_in_every_experiment() -> None:
    tensors = _tensors()
    sgd = _config(optim={"name": "sgd"})
    adam = _config(optim={"name": "adam", "lr": 0.01}, train={"ensemble": 5})
    for replica in range(2):
        (sgd_member,) = [m for m in members_of(sgd, 2) if m.replica == replica]
        adam_member = next(m for m in members_of(adam, 2) if m.replica == replica)
        a = initial_model(sgd, tensors, _META, sgd_member.seed).state_dict()
        b = initial_model(adam, tensors, _META, adam_member.seed).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    first, second = (initial_model(sgd, tensors, _META, m.seed) for m in members_of(sgd, 2))
    weight = "conv1.weight"
    assert not torch.equal(first.state_dict()[weight], second.state_dict()[weight])


class _Recorder(nn.Module):
    """A linear classifier that records which images each training batch held."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)
        self.seen: list[float] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(float(images.sum()))
        return self.linear(images.flatten(1))


@pytest.mark.parametrize("other", ["adam", "rmsprop"])
def test_the_data_order_depends_on_the_seed_only(other: str) -> None:
    tensors = _tensors()

    def order(optimizer_name: str, seed: int) -> list[float]:
        torch.manual_seed(0)
        model = _Recorder()
        optimizer = build_optimizer(model.parameters(), OptimConfig(name=optimizer_name))
        schedule = build_schedule(optimizer, ScheduleConfig(), epochs=2, steps_per_epoch=6)
        fit(
            model,
            optimizer,
            schedule,
            tensors["train"],
            tensors["val"],
            epochs=2,
            batch_size=10,
            early_stop=EarlyStopConfig(enabled=False),
            seed=seed,
        )
        return model.seen

    assert order("nesterov", 5) == order(other, 5)
    assert order("nesterov", 5) != order("nesterov", 6)
