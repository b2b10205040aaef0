"""The lecture's reference numbers: Lecture 10a's settings and its MNIST test accuracies,
the column the report sets beside each experiment."""

from __future__ import annotations

from typing import NamedTuple

from deepopt.paths import BEST_EXPERIMENT

__all__ = ["LECTURE", "LECTURE_DATASET", "LectureFigure"]

LECTURE_DATASET = "mnist"  # the data set of the lecture's figures


class LectureFigure(NamedTuple):
    setting: str
    test_acc: float | None  # the lecture's MNIST test accuracy; None: it reports none
    epochs: int | None  # epochs the lecture's run trained (early stopping included)


# Lecture 10a's settings and MNIST results (its "test accuracy:" outputs; the nobn_* figures
# are the ones it compares against: L2 0.966, dropout 0.968, ensemble 0.970).
LECTURE: dict[str, LectureFigure] = {
    "bn_sgd_earlystop": LectureFigure(
        "BN CNN, SGD lr 0.02, Nesterov 0.9, batch 50, early stopping (val_loss, 1e-4, 5), "
        "≤100 epochs",
        0.9804,
        25,
    ),
    "bn_sgd_decay": LectureFigure(
        "BN CNN, Nesterov SGD, inverse-time decay δ=1e-5 per batch, no early stopping",
        0.9805,
        50,
    ),
    "bn_sgd_plateau": LectureFigure(
        "BN CNN, Nesterov SGD, ReduceLROnPlateau (val_loss, factor 0.1, patience 5)",
        0.9803,
        50,
    ),
    "bn_sgd_linear": LectureFigure("BN CNN, Nesterov SGD, linear LR 0.02 → 0.0001", 0.9799, 50),
    "bn_adam": LectureFigure("BN CNN, Adam lr 0.01, early stopping", 0.9608, 12),
    "nobn": LectureFigure("CNN without BN (the plain network the no-BN rows improve)", None, None),
    "nobn_l2": LectureFigure("CNN without BN, L2 regularization", 0.966, None),
    "nobn_dropout": LectureFigure("CNN without BN, dropout", 0.968, None),
    "nobn_ensemble": LectureFigure("CNN without BN, 5-member ensemble", 0.970, None),
    "bn_sgd": LectureFigure("BN CNN, plain SGD", None, None),
    "bn_momentum": LectureFigure("BN CNN, SGD with momentum", None, None),
    "bn_adagrad": LectureFigure("BN CNN, AdaGrad", None, None),
    "bn_rmsprop": LectureFigure("BN CNN, RMSProp", None, None),
    "vanishing_sigmoid": LectureFigure("deep MLP, sigmoid, per-layer gradient norms", None, None),
    "vanishing_relu": LectureFigure("deep MLP, ReLU, per-layer gradient norms", None, None),
    "vanishing_relu_bn": LectureFigure("deep MLP, ReLU + BN, per-layer gradient norms", None, None),
    BEST_EXPERIMENT: LectureFigure("BN CNN with the Optuna study's best params", None, None),
    "plain_20": LectureFigure("20-layer plain CNN (ResNet without skips), BN", None, None),
    "resnet_20": LectureFigure("20-layer ResNet, BN (He et al. 2016)", None, None),
}
