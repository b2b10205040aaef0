"""deepopt: a reproducible pipeline for the experiments of a deep-learning lecture.

Importing the package is cheap: torch, mlflow and optuna are imported only by the stage
modules that need them, so ``deepopt --help`` starts fast.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
