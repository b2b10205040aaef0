"""Transfer learning: source and target tasks, frozen backbones, the transfer runs and
report; the stages ``pretrain`` and ``finetune`` call them.

Tasks. A task is some classes of a data set, relabelled 0, 1, ... in the order listed
(``transfer.source``/``transfer.target``). Its validation images and its training pool are
drawn from the data set's training file with one seeded random order per class: the first
``val_per_class`` of each class validate, the next ones train. The training pool is stored
rank by rank (the first image of every class, then the second of every class, ...), so
"the first k per class" is simply its first k x classes images and the smaller fine-tune
sets of one seed (below) are subsets of its larger ones: only the number of labels changes
between them. The test images are all test images of the task's classes.

Modes of a fine-tune (``transfer.modes``), all on the same network:

- ``linear_probe``: the pretrained backbone is frozen, the head alone learns. Frozen means
  its parameters get no gradient *and* its BatchNorm layers keep normalizing with the
  source's statistics (``FrozenBatchNorm``): the features are exactly the pretrained ones.
- ``finetune``: every layer learns from the pretrained start; the backbone's learning rate
  is ``optim.lr x transfer.backbone_lr_scale``.
- ``scratch``: the same network from random weights, the baseline.

The head (the last Conv/Linear layer) is always new, initialised like the network's other
layers from the run's seed, even when source and target have as many classes: the classes
mean something else.

Seeds. Every fine-tune runs once per seed (``transfer.seeds``: seed, seed + 1, ...). A
seed draws the labelled images (``seeded_pool``: the pool in that seed's order per class,
rank by rank again, so a seed's smaller sets are subsets of its larger ones), the new
head's initial weights and the batch order, the same for every mode: the modes compare
pairwise by seed. The pretrained backbone is one run.

The trainings themselves (run configs, pretrain.pt, the fine-tune runs) are in
``deepopt.transfer.runs``, and the report (its table, claim and plot) in
``deepopt.transfer.report``, neither re-exported here: the one imports the tracking
(MLflow), the other the report's statistics (scipy), which the pretrain stage and the
pure pieces above do not need.
"""

from deepopt.transfer.freezing import FrozenBatchNorm, freeze_backbone, load_backbone, param_groups
from deepopt.transfer.tasks import (
    Task,
    class_orders,
    few_shot,
    finetune_repeats,
    load_task,
    make_task,
    seeded_pool,
    select_classes,
    split_digest,
    task_digest,
    task_tensors,
)

__all__ = [
    "FrozenBatchNorm",
    "Task",
    "class_orders",
    "few_shot",
    "finetune_repeats",
    "freeze_backbone",
    "load_backbone",
    "load_task",
    "make_task",
    "param_groups",
    "seeded_pool",
    "select_classes",
    "split_digest",
    "task_digest",
    "task_tensors",
]
