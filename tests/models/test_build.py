"""build_model with a weights file: a new head, and weights that do not fit refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepopt.config import ModelConfig
from deepopt.errors import ConfigError
from deepopt.models import (
    build_model,
)


def test_weights_file_starts_a_network_with_a_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model(ModelConfig(name="resnet", depth=8, base_channels=4), num_classes=5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    config = ModelConfig(name="resnet", depth=8, base_channels=4, weights=str(tmp_path / "w.pt"))
    model = build_model(config, num_classes=3)
    assert torch.equal(model.conv0.weight, source.conv0.weight)
    assert model.logits.out_features == 3  # the 5-class head could not fit: left as built
    rebuilt = build_model(config, num_classes=3, load_weights=False)  # evaluate's rebuild
    assert not torch.equal(rebuilt.conv0.weight, source.conv0.weight)


def test_weights_that_do_not_fit_are_a_one_line_config_error(tmp_path: Path) -> None:
    other = build_model(ModelConfig(name="resnet", depth=14, base_channels=4))
    torch.save(other.state_dict(), tmp_path / "w.pt")
    config = ModelConfig(name="resnet", depth=8, base_channels=4, weights=str(tmp_path / "w.pt"))
    with pytest.raises(ConfigError, match=r"model\.weights: .*w\.pt does not fit .*unexpected"):
        build_model(config)
    missing = ModelConfig(weights=str(tmp_path / "none.pt"))
    with pytest.raises(ConfigError, match=r"model\.weights: .*none\.pt not found"):
        build_model(missing)
