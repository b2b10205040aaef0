"""The ``transfer`` section's schema: the source and target tasks of pretrain and finetune."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from deepopt.config.limits import MAX_EPOCHS, MAX_IMAGES, MAX_REPLICAS
from deepopt.config.run import DatasetName, Strict

__all__ = ["TRANSFER_MODES", "TransferConfig", "TransferMode", "TransferTask"]

TransferMode = Literal["linear_probe", "finetune", "scratch"]
TRANSFER_MODES: tuple[str, ...] = get_args(TransferMode)
# Images per class (more than any supported data set has; the stages check the real count).
PerClass = Annotated[int, Field(ge=1, le=MAX_IMAGES)]


class TransferTask(Strict):
    """A classification task made of some classes of a data set (relabelled 0, 1, ...)."""

    dataset: DatasetName = "fashion-mnist"
    classes: tuple[int, ...] = Field(min_length=2)

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value) or not all(0 <= c <= 9 for c in value):
            raise ValueError(f"{list(value)} must be distinct class indices in 0 to 9")
        return value


class TransferConfig(Strict):
    """The transfer pipeline (transfer/dvc.yaml): pretrain on ``source``, then fine-tune on
    ``target`` with few labelled images per class, in each of ``modes``."""

    source: TransferTask = TransferTask(classes=(0, 1, 2, 3, 4))
    target: TransferTask = TransferTask(classes=(5, 6, 7, 8, 9))
    # Training images per source class (from its training file); null = all of them.
    source_per_class: PerClass | None = 2000
    # Held out of the training files, per class, for validation (source and target alike).
    val_per_class: PerClass = 100
    # Labelled training images per target class: one fine-tune per size, mode and seed; a
    # seed's smaller sets are subsets of its larger ones.
    target_sizes: tuple[PerClass, ...] = Field((2, 10, 50, 200, 1000), min_length=1)
    modes: tuple[TransferMode, ...] = Field(("linear_probe", "finetune", "scratch"), min_length=1)
    # Every fine-tune (size x mode) runs once per seed, seed + k for k < seeds: seed + k
    # draws its labelled images and initialises its new head, so the modes pair by seed.
    # The pretrained backbone is one run (seed) for all of them.
    seeds: int = Field(3, ge=1, le=MAX_REPLICAS)
    # finetune: the backbone's learning rate is optim.lr times this (1 = the same).
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0)
    pretrain_epochs: int = Field(5, ge=1, le=MAX_EPOCHS)
    finetune_epochs: int = Field(10, ge=1, le=MAX_EPOCHS)  # every fine-tune, without early stopping
    # Batches per fine-tune epoch at least: a smaller training set is repeated (whole
    # copies, shuffled together) so that 10 images per class still get enough updates.
    finetune_min_batches: int = Field(30, ge=1, le=MAX_IMAGES)
    # Run-config overrides for both stages, in an experiments entry's shape (model, optim...).
    overrides: dict[str, Any] = Field(
        default_factory=lambda: {"model": {"name": "resnet", "depth": 8, "base_channels": 16}}
    )

    @model_validator(mode="after")
    def _check(self) -> TransferConfig:
        shared = set(self.source.classes) & set(self.target.classes)
        if self.source.dataset == self.target.dataset and shared:
            raise ValueError(
                f"transfer.target.classes: {sorted(shared)} are also source classes of "
                f"{self.source.dataset}; source and target classes must be disjoint"
            )
        if list(self.target_sizes) != sorted(set(self.target_sizes)) or self.target_sizes[0] < 1:
            raise ValueError(
                f"transfer.target_sizes: {list(self.target_sizes)} must be distinct positive "
                "counts in ascending order"
            )
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"transfer.modes: {list(self.modes)} lists a mode twice")
        if "data" in self.overrides:
            raise ValueError(
                "transfer.overrides.data: the data sets are transfer.source and transfer.target"
            )
        return self
