"""The lecture's figures, regenerated from code by the ``figures`` stage into ``figures/``:
``LECTURE_FIGURES`` names each one's file and caption.

Only the catalogue is imported here, so the report (which embeds the files it names) reads
it without torch. The figures come from the modules beside it, each imported by its path:
``activations`` (ReLU, sigmoid, tanh and derivatives), ``schedules`` (Keras' decay and
the lecture's ``sc``), ``trajectories`` and ``path_figures`` (the six optimizers on a
quadratic and on Rosenbrock, and the quadratic's rates against theory), ``smoothing``
(SGD smooths the loss) and ``catalogue`` (every figure's builder, the measured ones read
from the vanishing_* experiments' runs.csv).
"""

from __future__ import annotations

__all__ = ["LECTURE_FIGURES", "MEASURED_EXPERIMENTS"]

# figure key -> (file in paths.FIGURES_DIR, caption). The last two are measured: drawn
# only when the vanishing_* experiments (MEASURED_EXPERIMENTS) have been trained.
LECTURE_FIGURES: dict[str, tuple[str, str]] = {
    "activations": (
        "activations.png",
        "ReLU, sigmoid and tanh (the modules the networks train with) and their derivatives: "
        "ReLU's is 0 or 1, the sigmoid's at most 1/4 (the lecture's actfig).",
    ),
    "lr_decay": (
        "lr_keras_decay.png",
        "Keras' decay, η0 / (1 + δ k) per batch, over 50 epochs of 108 batches: δ = 1e-3 as "
        "the lecture's plot draws it, δ = 1e-5 as its code (and bn_sgd_decay) trains.",
    ),
    "lr_linear": (
        "lr_linear_sc.png",
        "The lecture's sc: linear from 0.02 to 0.0001 over 50 epochs, then held (70 drawn).",
    ),
    "paths_quadratic": (
        "paths_quadratic.png",
        "SGD, momentum, Nesterov, AdaGrad, RMSProp and Adam (torch.optim, built as training "
        "builds them, Keras' default knobs) on a quadratic of condition number 100, with "
        "exact gradients and with Gaussian gradient noise.",
    ),
    "paths_rosenbrock": (
        "paths_rosenbrock.png",
        "The same six optimizers in Rosenbrock's curved valley, without and with gradient noise.",
    ),
    "quadratic_rates": (
        "quadratic_rates.png",
        "Distance to the minimum on the quadratic (κ = 100): gradient descent at its best "
        "step, rate (κ−1)/(κ+1), and heavy-ball momentum at its best step and momentum, "
        "(√κ−1)/(√κ+1) (Goh, Why Momentum Really Works, Distill 2017); measured beside "
        "theory (heavy ball's double eigenvalue adds a factor k, hence the offset).",
    ),
    "sgd_smoothing": (
        "sgd_smoothing.png",
        "SGD smooths the loss: a loss with a local minimum convolved with the density of the "
        "step's gradient noise (std η σ) for growing learning rates η; the local minimum "
        "vanishes.",
    ),
    "zero_fraction": (
        "zero_fraction.png",
        "Measured: fraction of exactly-zero ReLU outputs per layer of the vanishing_* MLPs in "
        "the first and the last epoch, mean over the seeds with the min–max band.",
    ),
    "vanishing_gradient": (
        "vanishing_grad_norms.png",
        "Measured: mean gradient norm of each layer's weights of the vanishing_* MLPs "
        "(sigmoid, ReLU, ReLU + BatchNorm) in the first and the last epoch, mean over the "
        "seeds with the min–max band.",
    ),
}

# The experiments of params.yaml whose runs.csv the measured figures read, when they ran
# (dvc.yaml's figures stage depends on the plots/ folder: a file dep must exist, and a
# params.yaml without these experiments must still run; tests/illustrations check it).
MEASURED_EXPERIMENTS = ("vanishing_sigmoid", "vanishing_relu", "vanishing_relu_bn")
