"""The lecture's settings as Keras ran them, against Keras' formulas written out here.

No Keras at test time: each formula is Keras' update written in numpy from its source
(tf.keras 2, which the lecture ran: keras/optimizers/optimizer_v2/*.py and TensorFlow's
training_ops kernels; Keras 3: keras/src/optimizers/*.py and
keras/src/layers/normalization/batch_normalization.py), driven by the same gradients as
deepopt's optimizer. Gradients do not depend on the weights here (a linear loss), so both
see the same sequence and every difference is the update rule's.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from deepopt.config import ModelConfig, OptimConfig, ScheduleConfig, parse_params
from deepopt.errors import ConfigError
from deepopt.models import build_model
from deepopt.optim import build_optimizer, build_schedule

STEPS = 40
SHAPE = 6

Array = np.ndarray[Any, np.dtype[np.float64]]


def gradients(scale: float, seed: int = 0, steps: int = STEPS) -> Array:
    """[steps, SHAPE] gradients of random sign, their sizes 0.5 to 2 times ``scale``."""
    rng = np.random.default_rng(seed)
    sign = rng.choice([-1.0, 1.0], (steps, SHAPE))
    return scale * sign * rng.uniform(0.5, 2.0, (steps, SHAPE))


def deepopt_updates(
    cfg: OptimConfig,
    grads: Array,
    *,
    weight_decay_start: Array | None = None,
    schedule: ScheduleConfig | None = None,
) -> Array:
    """The step w_t - w_{t-1} deepopt's optimizer takes for each gradient (float64)."""
    start = np.zeros(SHAPE) if weight_decay_start is None else weight_decay_start
    weight = nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = build_optimizer([weight], cfg)
    lr_schedule = (
        None
        if schedule is None
        else build_schedule(optimizer, schedule, epochs=1, steps_per_epoch=len(grads))
    )
    steps = []
    for grad in grads:
        before = weight.detach().clone()
        weight.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
        if lr_schedule is not None:
            lr_schedule.after_batch()
        steps.append((weight.detach() - before).numpy())
    return np.array(steps)


def relative(a: Array, b: Array) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


# ---------------------------------------------------------------------------------------
# Keras' and torch's updates, in numpy (each returns the step w_t - w_{t-1} per gradient)


def keras_adam(
    grads: Array, *, lr: float, b1: float, b2: float, eps: float, wd: float = 0.0, w0: Array
) -> Array:
    """Keras' Adam (``update_step``); with ``wd`` Keras 3's AdamW: w -= lr wd w first."""
    m, v, w, steps = np.zeros(SHAPE), np.zeros(SHAPE), w0.copy(), []
    for t, g in enumerate(grads, 1):
        before = w.copy()
        w = w - lr * wd * w
        alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        w = w - m * alpha / (np.sqrt(v) + eps)  # "epsilon hat": eps before the correction
        steps.append(w - before)
    return np.array(steps)


def torch_adam(
    grads: Array, *, lr: float, b1: float, b2: float, eps: float, wd: float = 0.0, w0: Array
) -> Array:
    """torch's Adam/AdamW (decoupled wd): eps added after the bias correction."""
    m, v, w, steps = np.zeros(SHAPE), np.zeros(SHAPE), w0.copy(), []
    for t, g in enumerate(grads, 1):
        before = w.copy()
        w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr / (1 - b1**t) * m / (np.sqrt(v) / math.sqrt(1 - b2**t) + eps)
        steps.append(w - before)
    return np.array(steps)


def keras_rmsprop(
    grads: Array, *, lr: float, rho: float, eps: float, momentum: float, eps_inside: bool
) -> tuple[Array, Array]:
    """RMSprop's steps and its v before each step's division. tf.keras 2 without
    momentum: lr g / (sqrt(v) + eps); tf.keras 2 with momentum (TensorFlow's
    ApplyRMSProp) and Keras 3: lr g / sqrt(v + eps), momentum mom = mu mom + that."""
    v, mom, steps, vs = np.zeros(SHAPE), np.zeros(SHAPE), [], []
    for g in grads:
        v = rho * v + (1 - rho) * g * g
        vs.append(v)
        increment = lr * g / (np.sqrt(v + eps) if eps_inside else np.sqrt(v) + eps)
        mom = momentum * mom + increment
        steps.append(-mom)
    return np.array(steps), np.array(vs)


def keras_adagrad(
    grads: Array, *, lr: float, eps: float, initial: float, eps_inside: bool
) -> tuple[Array, Array]:
    """Adagrad's steps and its accumulator: tf.keras 2 (TensorFlow's ApplyAdagradV2)
    lr g / (sqrt(acc) + eps); Keras 3 lr g / sqrt(acc + eps)."""
    acc, steps, accs = np.full(SHAPE, initial), [], []
    for g in grads:
        acc = acc + g * g
        accs.append(acc)
        steps.append(-lr * g / (np.sqrt(acc + eps) if eps_inside else np.sqrt(acc) + eps))
    return np.array(steps), np.array(accs)


def keras_sgd(grads: Array, lrs: Array, *, momentum: float, nesterov: bool) -> Array:
    """Keras' SGD: v = mu v - lr g; w += v (nesterov: w += mu v - lr g)."""
    v, steps = np.zeros(SHAPE), []
    for g, lr in zip(grads, lrs, strict=True):
        v = momentum * v - lr * g
        steps.append(momentum * v - lr * g if nesterov else v)
    return np.array(steps)


# ---------------------------------------------------------------------------------------
# The defaults are Keras'


def test_optimizer_defaults_are_keras() -> None:
    def group(name: str) -> dict[str, Any]:
        cfg = OptimConfig(name=name)  # type: ignore[arg-type]
        return build_optimizer([nn.Parameter(torch.zeros(2))], cfg).param_groups[0]

    assert (group("rmsprop")["alpha"], group("rmsprop")["eps"]) == (0.9, 1e-7)
    assert group("adagrad")["eps"] == 1e-7
    assert group("adagrad")["initial_accumulator_value"] == 0.1
    for name in ("adam", "adamw"):
        assert OptimConfig(name=name).eps_placement == "keras"  # type: ignore[arg-type]
        assert (group(name)["eps"], group(name)["betas"]) == (1e-7, (0.9, 0.999))


def test_adagrad_starts_its_accumulator_at_initial_accumulator() -> None:
    weight = nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([weight], OptimConfig(name="adagrad", initial_accumulator=0.25))
    weight.grad = torch.ones(3)
    optimizer.step()
    assert torch.allclose(optimizer.state[weight]["sum"], torch.full((3,), 1.25))


# ---------------------------------------------------------------------------------------
# Adam and AdamW: eps where Keras puts it


# Gradients of 1e-6 make eps (1e-7) matter, most in the first steps where 1 - beta2^t is
# small: there the two placements differ by far more than the tolerance.
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_with_keras_placement_follows_keras_formula(name: str) -> None:
    grads = gradients(1e-6)
    w0 = np.linspace(-1.0, 1.0, SHAPE)
    wd = 0.01 if name == "adamw" else 0.0
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=wd)  # type: ignore[arg-type]
    ours = deepopt_updates(cfg, grads, weight_decay_start=w0)
    knobs = {"lr": 0.01, "b1": 0.9, "b2": 0.999, "eps": 1e-7, "wd": wd, "w0": w0}
    keras = keras_adam(grads, **knobs)
    assert relative(ours, keras) < 1e-6
    assert relative(torch_adam(grads, **knobs), keras) > 0.05  # the placement matters here


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_with_torch_placement_follows_torch_formula(name: str) -> None:
    grads = gradients(1e-6)
    w0 = np.linspace(-1.0, 1.0, SHAPE)
    wd = 0.01 if name == "adamw" else 0.0
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=wd, eps_placement="torch")  # type: ignore[arg-type]
    ours = deepopt_updates(cfg, grads, weight_decay_start=w0)
    torch_steps = torch_adam(grads, lr=0.01, b1=0.9, b2=0.999, eps=1e-7, wd=wd, w0=w0)
    assert relative(ours, torch_steps) < 1e-6


def test_keras_placement_in_float32_as_training_runs_it() -> None:
    grads = gradients(1e-5)
    weight = nn.Parameter(torch.zeros(SHAPE))
    optimizer = build_optimizer([weight], OptimConfig(name="adam", lr=0.01))
    for grad in grads:
        weight.grad = torch.tensor(grad, dtype=torch.float32)
        optimizer.step()
    keras = keras_adam(grads, lr=0.01, b1=0.9, b2=0.999, eps=1e-7, w0=np.zeros(SHAPE))
    final = keras.sum(axis=0)
    assert np.allclose(weight.detach().numpy(), final, rtol=1e-5, atol=1e-7)


def _adam_run(steps: int, start: dict[str, Any] | None = None) -> tuple[nn.Parameter, Any]:
    """A fresh deepopt Adam (keras placement), optionally resumed from a state dict."""
    grads = gradients(1e-6, steps=20)
    weight = nn.Parameter(torch.zeros(SHAPE, dtype=torch.float64))
    optimizer = build_optimizer([weight], OptimConfig(name="adam", lr=0.01))
    done = 0
    if start is not None:
        weight.data.copy_(start["weight"])
        optimizer.load_state_dict(start["optimizer"])
        done = start["done"]
    for grad in grads[done : done + steps]:
        weight.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
    return weight, optimizer


def test_keras_placement_survives_a_checkpoint_round_trip() -> None:
    uninterrupted, _ = _adam_run(20)
    weight, optimizer = _adam_run(8)
    buffer = io.BytesIO()  # saved and loaded as checkpoints are (weights_only)
    torch.save({"weight": weight.detach(), "optimizer": optimizer.state_dict(), "done": 8}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, _ = _adam_run(12, start=saved)
    assert torch.equal(resumed.detach(), uninterrupted.detach())


def test_keras_placement_survives_loading_into_the_same_optimizer() -> None:
    uninterrupted, _ = _adam_run(20)
    weight, optimizer = _adam_run(8)
    state = copy.deepcopy(optimizer.state_dict())
    for _ in range(3):  # steps taken and then undone, as a resume from an older checkpoint
        weight.grad = torch.ones(SHAPE, dtype=torch.float64)
        optimizer.step()
    saved_weight = _adam_run(8)[0].detach().clone()
    weight.data.copy_(saved_weight)
    optimizer.load_state_dict(state)
    for grad in gradients(1e-6, steps=20)[8:]:
        weight.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
    assert torch.equal(weight.detach(), uninterrupted.detach())


def test_keras_placement_keeps_each_param_groups_own_eps() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer(
        [{"params": [a]}, {"params": [b], "eps": 1e-3}], OptimConfig(name="adam", lr=0.01)
    )
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    optimizer.step()  # t = 1: eps / sqrt(1 - 0.999)
    assert [g["eps"] for g in optimizer.param_groups] == pytest.approx(
        [1e-7 / math.sqrt(1e-3), 1e-3 / math.sqrt(1e-3)]
    )


# ---------------------------------------------------------------------------------------
# RMSprop and Adagrad: tf.keras 2's formula exactly, Keras 3's within a stated bound


def test_rmsprop_follows_tf_keras_2_exactly() -> None:
    grads = gradients(1e-3)
    ours = deepopt_updates(OptimConfig(name="rmsprop", lr=0.001), grads)
    keras, _ = keras_rmsprop(grads, lr=0.001, rho=0.9, eps=1e-7, momentum=0.0, eps_inside=False)
    assert relative(ours, keras) < 1e-9


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_rmsprop_is_within_the_eps_bound_of_keras_3(momentum: float) -> None:
    # torch divides by sqrt(v) + eps, Keras 3 (and tf.keras 2 with momentum) by
    # sqrt(v + eps): each step's factor differs by at most eps / sqrt(v) + eps / (2 v)
    # (relative): large where sqrt(v) is near sqrt(eps) ~ 3e-4 (gradients of 1e-3 or less
    # in the first steps), about 2e-4 for these gradients of 0.05 to 0.2.
    grads = gradients(0.1)
    ours = deepopt_updates(OptimConfig(name="rmsprop", lr=0.001, momentum=momentum), grads)
    keras, vs = keras_rmsprop(
        grads, lr=0.001, rho=0.9, eps=1e-7, momentum=momentum, eps_inside=True
    )
    per_step = float(np.max(1e-7 / np.sqrt(vs) + 1e-7 / (2 * vs)))
    # With momentum a step sums earlier increments (mom = mu mom + increment, step = -mom):
    # compare the increments, -step_t + mu step_{t-1}, each within the bound.
    ours_increments, keras_increments = (
        -steps + momentum * np.vstack([np.zeros((1, SHAPE)), steps[:-1]]) for steps in (ours, keras)
    )
    difference = relative(ours_increments, keras_increments)
    assert 0 < difference <= per_step and per_step < 1e-3


def test_adagrad_follows_tf_keras_2_exactly() -> None:
    grads = gradients(1e-2)
    ours = deepopt_updates(OptimConfig(name="adagrad", lr=0.01), grads)
    keras, _ = keras_adagrad(grads, lr=0.01, eps=1e-7, initial=0.1, eps_inside=False)
    assert relative(ours, keras) < 1e-9


def test_adagrad_is_within_1e_6_of_keras_3() -> None:
    # sqrt(acc) + eps against sqrt(acc + eps), acc >= initial_accumulator = 0.1: each step
    # differs by at most eps / sqrt(0.1) + eps / 0.2 = 8.2e-7 (relative).
    grads = gradients(1.0)
    ours = deepopt_updates(OptimConfig(name="adagrad", lr=0.01), grads)
    keras, _ = keras_adagrad(grads, lr=0.01, eps=1e-7, initial=0.1, eps_inside=True)
    assert 0 < relative(ours, keras) <= 1e-7 / math.sqrt(0.1) + 1e-7 / 0.2


# ---------------------------------------------------------------------------------------
# SGD with momentum: equal at a constant rate, bounded under the lecture's decay


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
def test_sgd_momentum_equals_keras_at_a_constant_rate(name: str) -> None:
    grads = gradients(0.1)
    ours = deepopt_updates(OptimConfig(name=name, lr=0.02), grads)  # type: ignore[arg-type]
    keras = keras_sgd(grads, np.full(STEPS, 0.02), momentum=0.9, nesterov=name == "nesterov")
    assert relative(ours, keras) < 1e-9


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
def test_sgd_momentum_under_inverse_time_decay_is_within_its_bound(name: str) -> None:
    # Keras' velocity keeps each gradient at the rate it came with; torch rescales all of
    # it by the current rate. With lr_k = lr0 / (1 + delta k), |lr_{t-k} - lr_t| <= lr0
    # delta k, so a step differs by at most lr0 delta G mu / (1 - mu)^2 (times mu more for
    # nesterov), G the largest gradient. delta 1e-3 (the lecture's plot) shows it.
    delta, lr0, mu = 1e-3, 0.02, 0.9
    grads = gradients(0.1, steps=200)
    schedule = ScheduleConfig(name="inverse_time", decay=delta)
    ours = deepopt_updates(OptimConfig(name=name, lr=lr0), grads, schedule=schedule)  # type: ignore[arg-type]
    lrs = lr0 / (1 + delta * np.arange(len(grads)))
    keras = keras_sgd(grads, lrs, momentum=mu, nesterov=name == "nesterov")
    bound = lr0 * delta * np.max(np.abs(grads)) * mu / (1 - mu) ** 2
    bound *= mu if name == "nesterov" else 1.0
    difference = float(np.max(np.abs(ours - keras)))
    assert 0 < difference <= bound


# ---------------------------------------------------------------------------------------
# BatchNorm: Keras' momentum 0.99 and epsilon 1e-3 in every network deepopt builds


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize(
    "model", [{"name": "lecture_cnn"}, {"name": "mlp", "depth": 3}, {"name": "resnet"}]
)
def test_every_batchnorm_takes_the_configs_momentum_and_eps(model: dict[str, Any]) -> None:
    default = _batchnorms(build_model(ModelConfig(**model)))
    assert default and all((m.momentum, m.eps) == (0.01, 1e-3) for m in default)
    chosen = _batchnorms(build_model(ModelConfig(**model, bn_momentum=0.1, bn_eps=1e-5)))
    assert all((m.momentum, m.eps) == (0.1, 1e-5) for m in chosen)


def test_torchvision_models_keep_their_own_batchnorm() -> None:
    model = build_model(ModelConfig(name="torchvision:resnet18", bn_momentum=0.5, bn_eps=0.1))
    norms = _batchnorms(model)
    assert norms and all((m.momentum, m.eps) == (0.1, 1e-5) for m in norms)


def _dense_bn_run(batches: int, batch_size: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """A one-layer BN MLP in training mode, and dense1's outputs (bn1's inputs)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", depth=1, width=4), image_shape=(1, 3, 3))
    seen: list[torch.Tensor] = []
    model.get_submodule("dense1").register_forward_hook(
        lambda module, args, out: seen.append(out.detach().double())
    )
    model.train()
    with torch.no_grad():
        for k in range(batches):
            model(torch.randn(batch_size, 1, 3, 3) * (1 + k % 3) + k % 2)
    return model, seen


def test_running_mean_follows_keras_moving_average() -> None:
    model, seen = _dense_bn_run(batches=30, batch_size=16)
    moving = np.zeros(4)  # Keras' moving_mean starts at 0, as torch's running_mean
    for out in seen:
        moving = 0.99 * moving + 0.01 * out.mean(0).numpy()  # Keras momentum 0.99
    norm = model.get_submodule("bn1")
    assert isinstance(norm, nn.BatchNorm1d) and norm.running_mean is not None
    assert np.allclose(norm.running_mean.double().numpy(), moving, rtol=1e-5, atol=1e-7)


def test_running_variance_is_keras_up_to_bessels_correction() -> None:
    # Keras averages the biased batch variance, torch the unbiased one (n / (n - 1) times
    # it): the same moving average of the unbiased variance, and within max var / (n - 1)
    # of Keras' own.
    n = 16
    model, seen = _dense_bn_run(batches=30, batch_size=n)
    biased, unbiased = np.ones(4), np.ones(4)  # both start at 1
    for out in seen:
        biased = 0.99 * biased + 0.01 * out.var(0, unbiased=False).numpy()
        unbiased = 0.99 * unbiased + 0.01 * out.var(0, unbiased=True).numpy()
    norm = model.get_submodule("bn1")
    assert isinstance(norm, nn.BatchNorm1d) and norm.running_var is not None
    running = norm.running_var.double().numpy()
    assert np.allclose(running, unbiased, rtol=1e-5)
    largest = max(float(out.var(0, unbiased=False).max()) for out in seen)
    assert 0 < np.max(np.abs(running - biased)) <= largest / (n - 1)


def test_batchnorm_normalizes_with_eps_added_to_the_batch_variance() -> None:
    model, seen = _dense_bn_run(batches=1, batch_size=8)
    norm = model.get_submodule("bn1").train()
    x = seen[0].float()
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3)  # gamma 1, beta 0
    assert torch.allclose(norm(x), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Config: bad values are one-line errors naming the allowed range


@pytest.mark.parametrize(
    ("section", "changes", "expected"),
    [
        ("model", {"bn_momentum": 0}, "model.bn_momentum: 0 is out of range; allowed: "),
        ("model", {"bn_momentum": 1.5}, "model.bn_momentum: 1.5 is out of range; allowed: "),
        ("model", {"bn_eps": 0}, "model.bn_eps: 0 is out of range; allowed: "),
        ("model", {"bn_eps": 2.0}, "model.bn_eps: 2.0 is out of range; allowed: "),
        (
            "optim",
            {"name": "adagrad", "initial_accumulator": -1},
            "optim.initial_accumulator: -1 is out of range; allowed: ",
        ),
        (
            "optim",
            {"name": "adam", "eps_placement": "tf"},
            "optim.eps_placement: 'tf' is not one of keras, torch",
        ),
        (
            "optim",
            {"name": "nesterov", "eps_placement": "keras"},
            "optim.eps_placement: does not apply to optim.name 'nesterov'",
        ),
        (
            "optim",
            {"name": "rmsprop", "initial_accumulator": 0.1},
            "optim.initial_accumulator: does not apply to optim.name 'rmsprop'",
        ),
    ],
)
def test_bad_keras_settings_are_one_line_config_errors(
    base_params: dict[str, Any], section: str, changes: dict[str, Any], expected: str
) -> None:
    raw = copy.deepcopy(base_params)
    raw["experiments"] = {}
    # optim: a section of its own, so that no knob of the base optimizer is left over.
    raw[section] = {"lr": 0.01, **changes} if section == "optim" else {**raw[section], **changes}
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"params.yaml: {expected}"), message


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("bn_momentum", 0, "finite numbers > 0.0 and <= 1.0"),
        ("bn_eps", -1e-3, "finite numbers > 0.0 and <= 1.0"),
    ],
)
def test_batchnorm_errors_name_the_range(
    base_params: dict[str, Any], key: str, value: float, allowed: str
) -> None:
    raw = copy.deepcopy(base_params)
    raw["model"] = {**raw.get("model", {}), key: value}
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert str(caught.value).endswith(f"allowed: {allowed}")


def test_new_knobs_are_in_the_resolved_config() -> None:
    # They are config fields, so MLflow logs them and config_hash keys checkpoints by them.
    assert OptimConfig(name="adam").model_dump()["eps_placement"] == "keras"
    assert OptimConfig(name="adagrad").model_dump()["initial_accumulator"] == 0.1
    assert (ModelConfig().bn_momentum, ModelConfig().bn_eps) == (0.01, 1e-3)


def test_a_model_config_saved_before_the_batchnorm_knobs_keeps_pytorchs_batchnorm() -> None:
    """model.pt and pretrain.pt from before model.bn_momentum/bn_eps were trained with
    PyTorch's 0.1 / 1e-5: they are rebuilt with those, not with today's Keras defaults."""
    from deepopt.config import saved_model_config

    old = saved_model_config({"name": "lecture_cnn", "batchnorm": True})
    assert (old.bn_momentum, old.bn_eps) == (0.1, 1e-5)
    new = saved_model_config(ModelConfig().model_dump(mode="json"))
    assert (new.bn_momentum, new.bn_eps) == (0.01, 1e-3) == (ModelConfig().bn_momentum, 1e-3)
