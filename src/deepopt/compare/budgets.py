"""The report's budget check at its source: every study's finished trials counted in the
Optuna storage itself, not taken from studies.json (optuna and the config only: the report
stage imports no torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from deepopt.config import StorageUrl
from deepopt.errors import DataError, one_line

__all__ = ["count_finished"]

_RERUN = "run `dvc repro compare/dvc.yaml`"


def _storage(url: StorageUrl) -> BaseStorage | str:
    if url.file is not None and not url.file.exists():
        raise DataError(f"compare.storage: {url.url} does not exist; {_RERUN}")
    if url.scheme == "journal":
        assert url.file is not None
        return JournalStorage(JournalFileBackend(str(url.file)))
    return url.url  # an SQLAlchemy URL, which Optuna opens itself


def count_finished(
    url: StorageUrl, names: Mapping[str, str], optimizers: Sequence[str]
) -> dict[str, int]:
    """optimizer -> the finished (complete + pruned) trials of its study (``names``:
    optimizer -> study name) in the storage at ``url``; a study missing there is a
    DataError."""
    storage = _storage(url)
    counts = {}
    for optimizer in optimizers:
        name = names[optimizer]
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise DataError(
                f"compare.storage: {url.url} holds no study {name!r} ({optimizer}); {_RERUN}"
            ) from None
        except Exception as err:  # a damaged or foreign file: one line
            raise DataError(
                f"compare.storage: {url.url} cannot be read ({one_line(err)}); {_RERUN}"
            ) from None
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        counts[optimizer] = len(finished)
    return counts
