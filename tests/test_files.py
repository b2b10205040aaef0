"""deepopt.files: the one guarded torch.load, on real files in tmp_path."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from deepopt.errors import DataError
from deepopt.files import UnreadableFileError, load_torch, write_torch


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled with code execution",))


def test_tensors_and_plain_data_load_on_the_cpu(tmp_path: Path) -> None:
    target = tmp_path / "plain.pt"
    write_torch(target, {"weights": torch.arange(3.0), "names": ["a"], "epoch": 2})
    content = load_torch(target)
    assert content["names"] == ["a"] and content["epoch"] == 2
    assert torch.equal(content["weights"], torch.arange(3.0))
    assert content["weights"].device.type == "cpu"


def test_a_missing_file_is_left_to_the_caller_to_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_torch(tmp_path / "nothing.pt")


def test_a_pickle_that_would_run_code_is_refused_unread(tmp_path: Path) -> None:
    target = tmp_path / "evil.pt"
    target.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(UnreadableFileError) as caught:
        load_torch(target)
    assert caught.value.problem.startswith("it holds objects other than tensors")
    assert "weights_only=False" not in str(caught.value)  # torch's unsafe advice is not passed on
    assert isinstance(caught.value, DataError)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"PK\x03\x04truncated"])
def test_damaged_bytes_are_one_line(tmp_path: Path, content: bytes) -> None:
    target = tmp_path / "damaged.pt"
    target.write_bytes(content)
    with pytest.raises(UnreadableFileError) as caught:
        load_torch(target)
    message = str(caught.value)
    assert message.startswith(f"{target}: cannot be loaded (") and "\n" not in message
