"""The lecture's optimizers and learning-rate schedules, built from torch.optim only, with
each schedule's formula written once (see "the lecture's formulas" below)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn
from torch.optim import lr_scheduler

from deepopt.config import OPTIMIZER_NAMES, SCHEDULE_NAMES, OptimConfig, ScheduleConfig
from deepopt.config.run import check_cosine_warmup
from deepopt.errors import ConfigError, DeepoptError

__all__ = [
    "COSINE_FLOOR",
    "LRSchedule",
    "build_optimizer",
    "build_schedule",
    "cosine_factor",
    "inverse_time_factor",
    "keras_plateau_translation",
    "linear_factor",
    "place_eps_as_keras",
]

# cosine's default min_lr as a fraction of eta0: its last epoch still trains.
COSINE_FLOOR = 0.01

_T = TypeVar("_T")


def _filled(value: _T | None, key: str) -> _T:
    """A knob as validation filled it in: the config (``OPTIMIZER_KNOBS``/``SCHEDULE_KNOBS``)
    holds every default, so an unset knob here means the config skipped validation."""
    if value is None:
        raise DeepoptError(f"internal: {key} is unset; configs must be validated to fill it in")
    return value


def build_optimizer(
    parameters: Iterable[nn.Parameter] | list[dict[str, Any]], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """The torch.optim optimizer named by ``cfg.name``, with the knobs the config filled in.

    ``parameters`` are a module's parameters or param groups; a group's own ``lr`` or
    ``weight_decay`` overrides the config's. ``momentum`` and ``nesterov`` are the
    lecture's SGD with momentum 0.9 (``nesterov=True`` for the latter); ``rho`` is
    RMSprop's ``alpha``; ``eps`` is the lecture's delta; ``betas`` its (rho1, rho2).

    The defaults are Keras' (``OPTIMIZER_KNOBS``), and with them each optimizer follows
    the update of the Keras the lecture ran (tf.keras 2, whose ``lr=``/``decay=`` arguments
    it uses) as far as torch's formulas allow; what is left is written next to each
    builder below and bounded in tests/test_keras_settings.py.
    """
    lr, weight_decay = cfg.lr, cfg.weight_decay
    optim = torch.optim
    # fused: one kernel for all parameters instead of a few ops per tensor; the lecture
    # CNN's SGD step takes ~1 ms instead of ~8 (benchmarks/bench_train.py), bitwise equal
    # for SGD and within 1e-6 for Adam/AdamW/Adagrad. RMSprop has no fused kernel: foreach.
    if cfg.name == "sgd":
        return optim.SGD(parameters, lr=lr, momentum=0.0, weight_decay=weight_decay, fused=True)
    if cfg.name in ("momentum", "nesterov"):
        # torch keeps b = mu b + g and steps lr b; Keras keeps v = mu v - lr g and steps v
        # (nesterov: mu v - lr g). Equal while lr is constant; when lr changes, torch
        # applies the new rate to the whole velocity at once, Keras only to new gradients
        # (a relative difference of about delta mu / (1 - mu) = 1e-4 per batch under the
        # lecture's inverse-time decay, a few batches of transient after a plateau's cut).
        return optim.SGD(
            parameters,
            lr=lr,
            momentum=_filled(cfg.momentum, "optim.momentum"),
            nesterov=cfg.name == "nesterov",
            weight_decay=weight_decay,
            fused=True,
        )
    if cfg.name == "adagrad":
        # torch's update lr g / (sqrt(acc) + eps) is tf.keras 2's (TensorFlow's
        # ApplyAdagradV2); Keras 3 divides by sqrt(acc + eps) instead (relative difference
        # at most eps / sqrt(acc) + eps / (2 acc), ~8e-7 with the defaults: acc >= 0.1).
        return optim.Adagrad(
            parameters,
            lr=lr,
            eps=_filled(cfg.eps, "optim.eps"),
            initial_accumulator_value=_filled(cfg.initial_accumulator, "optim.initial_accumulator"),
            weight_decay=weight_decay,
            fused=True,
        )
    if cfg.name == "rmsprop":
        # Without momentum torch's update lr g / (sqrt(v) + eps) is tf.keras 2's; with
        # momentum tf.keras 2 (TensorFlow's ApplyRMSProp), and Keras 3 always, divide by
        # sqrt(v + eps) instead, which differs where sqrt(v) is near sqrt(eps) ~ 3e-4.
        return optim.RMSprop(
            parameters,
            lr=lr,
            alpha=_filled(cfg.rho, "optim.rho"),
            eps=_filled(cfg.eps, "optim.eps"),
            momentum=_filled(cfg.momentum, "optim.momentum"),
            weight_decay=weight_decay,
            foreach=True,
        )
    if cfg.name in ("adam", "adamw"):
        adam = optim.Adam if cfg.name == "adam" else optim.AdamW
        betas = tuple(_filled(cfg.betas, "optim.betas"))
        optimizer = adam(
            parameters,
            lr=lr,
            betas=(betas[0], betas[1]),
            eps=_filled(cfg.eps, "optim.eps"),
            weight_decay=weight_decay,
            fused=True,
        )
        if _filled(cfg.eps_placement, "optim.eps_placement") == "keras":
            place_eps_as_keras(optimizer)
        return optimizer
    raise ConfigError(f"optim.name: {cfg.name!r} is not one of {', '.join(OPTIMIZER_NAMES)}")


def place_eps_as_keras(optimizer: torch.optim.Optimizer) -> None:
    """Make a torch Adam/AdamW take Keras' update, eps as Keras places it ("epsilon hat").

    Keras: w -= alpha m / (sqrt(v) + eps), alpha = lr sqrt(1 - beta2^t) / (1 - beta1^t).
    torch: w -= lr / (1 - beta1^t) m / (sqrt(v) / sqrt(1 - beta2^t) + eps'), which is
    Keras' with eps' = eps / sqrt(1 - beta2^t). A step pre-hook sets each param group's
    eps to that before every step, t being the step about to be taken, read from the
    optimizer's own state (so it stays right after ``load_state_dict``, and a step that
    fp16's GradScaler skips is not counted). Each group keeps the eps it was built with.
    Reading the step costs one host sync per step on a GPU, where the state lives.
    """
    base_eps = [float(group["eps"]) for group in optimizer.param_groups]

    def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, eps in zip(opt.param_groups, base_eps, strict=True):
            t = _steps_taken(opt, group) + 1
            group["eps"] = eps / math.sqrt(1.0 - float(group["betas"][1]) ** t)

    optimizer.register_step_pre_hook(before_step)


def _steps_taken(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> int:
    """The group's step count (its parameters step together); 0 before the first step."""
    for parameter in group["params"]:
        state = optimizer.state.get(parameter)
        if state and "step" in state:
            return int(state["step"])
    return 0


# --- the lecture's formulas, as multiples of eta0 -------------------------------------
# Each is a pure function of the epoch (or batch) index k, counted from 0, that returns
# the learning rate as a multiple of the initial rate eta0 (the lr_lambda of LambdaLR):
#
# - constant:      eta_k = eta0
# - linear:        eta_k = (1 - a) eta0 + a eta_T,  a = min(k / T, 1)      (per epoch)
# - inverse_time:  eta_k = eta0 / (1 + delta k)                             (per batch)
# - step:          eta_k = eta0 gamma^floor(k / step_size)                  (per epoch)
# - cosine:        warmup eta0 (k + 1) / (W + 1) for k < W, then
#                  min_lr + (eta0 - min_lr) (1 + cos(pi t)) / 2,
#                  t = (k - W) / (E - 1 - W), reaching min_lr at the last epoch E - 1
#                  (min_lr defaults to eta0 / 100: every epoch trains at a positive rate)
# - plateau:       Keras' ReduceLROnPlateau on the monitored validation metric (per epoch)


def linear_factor(k: int, *, lr0: float, final_lr: float, horizon: int) -> float:
    """Linear change from eta0 at epoch 0 to eta_T at epoch T, then held (the lecture's sc)."""
    alpha = min(k / horizon, 1.0)
    return ((1.0 - alpha) * lr0 + alpha * final_lr) / lr0


def inverse_time_factor(k: int, *, decay: float) -> float:
    """Keras' ``decay``: eta0 / (1 + delta k), k counting batches from 0."""
    return 1.0 / (1.0 + decay * k)


def cosine_factor(k: int, *, lr0: float, min_lr: float, warmup_epochs: int, epochs: int) -> float:
    """Linear warmup to eta0 over ``warmup_epochs``, then a half cosine to ``min_lr``.

    Warmup epochs use eta0 (k + 1) / (W + 1), so the rate rises from eta0 / (W + 1) and
    the first cosine epoch W uses eta0 itself. The cosine reaches ``min_lr`` at the last
    epoch E - 1; with a single cosine epoch (W = E - 1) that epoch uses eta0.
    """
    if k < warmup_epochs:
        return (k + 1) / (warmup_epochs + 1)
    span = max(epochs - 1 - warmup_epochs, 1)
    progress = min((k - warmup_epochs) / span, 1.0)
    return (min_lr + (lr0 - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))) / lr0


def keras_plateau_translation(patience: int, cooldown: int) -> tuple[int, int]:
    """torch ``(patience, cooldown)`` that reproduce Keras' ReduceLROnPlateau.

    Keras counts bad epochs in ``wait`` and reduces when ``wait >= patience``; torch
    reduces when ``num_bad_epochs > patience``: torch patience = Keras patience - 1
    (Keras' patience 0 behaves as 1: every bad epoch reduces). Keras decrements its
    cooldown counter before counting the epoch, so the epoch on which the counter reaches
    0 already counts as bad; torch zeroes the bad count on that epoch too: torch
    cooldown = Keras cooldown - 1 (Keras' cooldown 1 has no effect).
    """
    return max(patience - 1, 0), max(cooldown - 1, 0)


# --- the schedule object the training loop drives -------------------------------------


class LRSchedule:
    """A torch LR scheduler plus when to step it (per batch or per epoch).

    It hides which schedules step per batch and which per epoch: a training loop calls
    ``after_batch()`` after every optimizer step and ``after_epoch(metrics)`` after every
    validation, and the rate in ``optimizer.param_groups`` is then the one the next batch
    must use.
    """

    def __init__(
        self,
        name: str,
        scheduler: lr_scheduler.LRScheduler,
        optimizer: torch.optim.Optimizer,
        *,
        per_batch: bool = False,
        monitor: str | None = None,
    ) -> None:
        self.name = name
        self.per_batch = per_batch  # set by the schedule's builder below
        self.monitor = monitor  # plateau only: the metric key after_epoch reads
        self._scheduler = scheduler
        self._optimizer = optimizer

    def after_batch(self) -> None:
        """Call after each ``optimizer.step()``; steps per-batch schedules."""
        if self.per_batch:
            self._scheduler.step()

    def after_epoch(self, metrics: Mapping[str, float]) -> None:
        """Call after each epoch's validation; steps per-epoch schedules."""
        if isinstance(self._scheduler, lr_scheduler.ReduceLROnPlateau):
            assert self.monitor is not None  # set by build_schedule for plateau
            if self.monitor not in metrics:
                known = ", ".join(sorted(metrics)) or "none"
                raise DeepoptError(
                    f"schedule.monitor: metric {self.monitor!r} was not reported "
                    f"(reported: {known})"
                )
            self._scheduler.step(float(metrics[self.monitor]))
        elif not self.per_batch:
            self._scheduler.step()

    def current_lr(self) -> float:
        """The learning rate the next batch uses (of the first param group)."""
        return float(self._optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Plain data (numbers, strings, lists): loads with ``torch.load(weights_only=True)``."""
        return {"name": self.name, "scheduler": self._scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved schedule; also restores the param groups' current rates."""
        if state.get("name") != self.name:
            raise DeepoptError(
                f"checkpoint schedule {state.get('name')!r} does not match "
                f"schedule.name {self.name!r}; delete the checkpoint or change the config"
            )
        self._scheduler.load_state_dict(dict(state["scheduler"]))
        # The scheduler recomputes a rate only on its next step; until then the optimizer
        # must already hold the saved rate, whether or not its own state was loaded.
        for group, lr in zip(
            self._optimizer.param_groups, self._scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = float(lr)


# --- one builder per schedule.name: the only place that dispatches on it -------------
# Each reads the knobs the config filled in; the two the config leaves null are derived by
# their builder when the run length and eta0 are known: linear's horizon (train.epochs)
# and cosine's min_lr (COSINE_FLOOR x eta0). They stay null in the resolved config because
# it is what MLflow logs as params and what config_hash keys checkpoints and studies by.

_Builder = Callable[[torch.optim.Optimizer, ScheduleConfig, int], LRSchedule]


def _lambda(
    cfg: ScheduleConfig,
    optimizer: torch.optim.Optimizer,
    factor: Callable[[int], float],
    *,
    per_batch: bool = False,
) -> LRSchedule:
    scheduler = lr_scheduler.LambdaLR(optimizer, factor)
    return LRSchedule(cfg.name, scheduler, optimizer, per_batch=per_batch)


def _constant(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int) -> LRSchedule:
    return _lambda(cfg, optimizer, lambda k: 1.0)


def _linear(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int) -> LRSchedule:
    lr0 = float(optimizer.defaults["lr"])
    final_lr = float(_filled(cfg.final_lr, "schedule.final_lr"))
    horizon = epochs if cfg.horizon is None else cfg.horizon  # null: the whole run

    def factor(k: int) -> float:
        return linear_factor(k, lr0=lr0, final_lr=final_lr, horizon=horizon)

    return _lambda(cfg, optimizer, factor)


def _inverse_time(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int) -> LRSchedule:
    decay = float(_filled(cfg.decay, "schedule.decay"))
    # k counts batches: the one schedule that steps after every batch, as Keras' decay.
    return _lambda(cfg, optimizer, lambda k: inverse_time_factor(k, decay=decay), per_batch=True)


def _step(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int) -> LRSchedule:
    scheduler = lr_scheduler.StepLR(
        optimizer,
        step_size=_filled(cfg.step_size, "schedule.step_size"),
        gamma=float(_filled(cfg.gamma, "schedule.gamma")),
    )
    return LRSchedule(cfg.name, scheduler, optimizer)


def _cosine(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int) -> LRSchedule:
    lr0 = float(optimizer.defaults["lr"])
    warmup_epochs = _filled(cfg.warmup_epochs, "schedule.warmup_epochs")
    min_lr = lr0 * COSINE_FLOOR if cfg.min_lr is None else float(cfg.min_lr)
    try:  # the run config checks it too; epochs here is the caller's
        check_cosine_warmup(warmup_epochs, epochs)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    def factor(k: int) -> float:
        return cosine_factor(k, lr0=lr0, min_lr=min_lr, warmup_epochs=warmup_epochs, epochs=epochs)

    return _lambda(cfg, optimizer, factor)


def _plateau(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int) -> LRSchedule:
    monitor = _filled(cfg.monitor, "schedule.monitor")
    patience, cooldown = keras_plateau_translation(
        _filled(cfg.patience, "schedule.patience"), _filled(cfg.cooldown, "schedule.cooldown")
    )
    scheduler = lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max" if monitor == "val_acc" else "min",
        factor=float(_filled(cfg.factor, "schedule.factor")),
        patience=patience,
        threshold=float(_filled(cfg.min_delta, "schedule.min_delta")),
        threshold_mode="abs",  # Keras' min_delta is an absolute change
        cooldown=cooldown,
        min_lr=float(_filled(cfg.min_lr, "schedule.min_lr")),
        eps=0.0,  # Keras reduces whenever lr > min_lr; torch's default skips < 1e-8
    )
    return LRSchedule(cfg.name, scheduler, optimizer, monitor=monitor)


_BUILDERS: dict[str, _Builder] = {
    "constant": _constant,
    "linear": _linear,
    "inverse_time": _inverse_time,
    "plateau": _plateau,
    "step": _step,
    "cosine": _cosine,
}


def build_schedule(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    *,
    epochs: int,
    steps_per_epoch: int,
) -> LRSchedule:
    """The schedule named by ``cfg.name``, starting from the optimizer's current rate.

    ``epochs`` is the planned run length (linear's default horizon, cosine's end);
    ``steps_per_epoch`` the batches per epoch, checked here so that every schedule takes
    the same arguments. Rates in ``final_lr``/``min_lr`` of linear and cosine are absolute
    for a param group starting at ``optim.lr`` and scale with any group that starts
    elsewhere; plateau's ``min_lr`` is absolute for every group, as in Keras.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ConfigError(
            f"schedule: epochs ({epochs}) and steps_per_epoch ({steps_per_epoch}) must be >= 1"
        )
    builder = _BUILDERS.get(cfg.name)
    if builder is None:
        raise ConfigError(f"schedule.name: {cfg.name!r} is not one of {', '.join(SCHEDULE_NAMES)}")
    return builder(optimizer, cfg, epochs)
