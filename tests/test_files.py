"""deepopt.files on real files in tmp_path: the wall every output passes before anything is
created, writes that fail (a full disk) keeping the previous file, the lock files of
processes sharing a workspace, and the one guarded torch.load."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from deepopt import cli, files, paths
from deepopt.errors import ConfigError, DataError, DeepoptError
from deepopt.files import UnreadableFileError, load_torch, write_torch

# ---------------------------------------------------------------------------------------
# The wall: every output stays in the workspace or a folder the user configured

WRITERS: dict[str, Callable[[str | Path], object]] = {
    "write_bytes": lambda target: files.write_bytes(target, b"x"),
    "write_text": lambda target: files.write_text(target, "x"),
    "write_json": lambda target: files.write_json(target, {"x": 1}),
    "write_torch": lambda target: files.write_torch(target, {"x": torch.zeros(2)}),
}


def _locked(target: str | Path) -> None:
    with files.exclusive(target, "training small seed 1", "busy"):
        pass


def _claimed(target: str | Path) -> None:
    with files.FileLock(Path(target)):
        pass


# Everything that creates a folder or opens a file for writing.
OPENERS = {**WRITERS, "check_writable": files.check_writable, "exclusive": _locked}
OPENERS["FileLock"] = _claimed


@pytest.fixture()
def only_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace (a git folder) the test runs in; as in a real process, nothing but the
    workspace is allowed (conftest's tmp_path allowance is dropped)."""
    work = tmp_path / "work"
    (work / ".git").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(paths, "_CONFIGURED", {})
    return work


def _escapes(outside: Path) -> list[str]:
    """Paths that leave the workspace the ways a name that got past its check would."""
    return [
        "../outside/x.out",  # what `--experiment ..` makes of models/<name>
        "models/../../outside/x.out",
        "models/small/../../../outside/deeper/x.out",
        str(Path("models") / outside / "x.out"),  # an absolute "name" replaces the folder
    ]


@pytest.mark.parametrize("opener", sorted(OPENERS))
@pytest.mark.parametrize("escape", range(4))
def test_every_writer_refuses_a_path_out_of_the_workspace_before_creating_anything(
    only_workspace: Path, tmp_path: Path, opener: str, escape: int
) -> None:
    target = _escapes(tmp_path / "outside")[escape]
    with pytest.raises(ConfigError) as caught:
        OPENERS[opener](target)
    message = str(caught.value)
    assert message.startswith(f"refusing to write {target}: it resolves to {tmp_path}/outside")
    assert f"outside {only_workspace};" in message and "\n" not in message
    assert caught.value.exit_code == 2
    assert not (tmp_path / "outside").exists()
    assert [p.name for p in only_workspace.iterdir()] == [".git"]  # no models/ either


def test_an_output_folder_linked_out_of_the_workspace_is_refused_one_linked_inside_is_not(
    only_workspace: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (only_workspace / "models").symlink_to(outside)
    for opener in OPENERS.values():
        with pytest.raises(ConfigError, match=f"resolves to {outside}/small/x.out, outside"):
            opener("models/small/x.out")
    assert list(outside.iterdir()) == []
    (only_workspace / "store").mkdir()
    (only_workspace / "plots").symlink_to(only_workspace / "store")
    files.write_json("plots/small/x.json", {"x": 1})  # the link stays inside: fine
    assert (only_workspace / "store" / "small" / "x.json").is_file()


def test_an_output_that_is_itself_a_symlink_is_replaced_not_written_through(
    only_workspace: Path, tmp_path: Path
) -> None:
    # As DVC's symlink cache type leaves an out: a link into a cache anywhere.
    cached = tmp_path / "cache" / "ab" / "12cd"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")
    (only_workspace / "model.pt").symlink_to(cached)
    files.write_bytes("model.pt", b"new")
    assert not (only_workspace / "model.pt").is_symlink()
    assert (only_workspace / "model.pt").read_bytes() == b"new"
    assert cached.read_bytes() == b"cached"


def test_a_configured_checkpoint_folder_is_written_anywhere_and_names_stay_inside_it(
    only_workspace: Path, tmp_path: Path
) -> None:
    root = tmp_path / "scratch" / "checkpoints"  # train.checkpoint_dir: an absolute path
    folder = paths.checkpoint_dir(str(root), "small")
    files.write_torch(folder / "member.pt", {"epoch": 1})
    assert load_torch(root / "small" / "member.pt") == {"epoch": 1}
    assert paths.transfer_checkpoint_dir(str(root), "pretrain") == root / "transfer" / "pretrain"
    for name in ("..", ".", "", "a/b", "../small", str(tmp_path / "elsewhere")):
        with pytest.raises(ConfigError, match="a name must be one plain folder name"):
            paths.checkpoint_dir(str(root), name)
    # Inside the configured folder a symlink out of it is refused like one in the workspace.
    (tmp_path / "other").mkdir()
    (root / "linked").symlink_to(tmp_path / "other")
    with pytest.raises(ConfigError, match="outside"):
        files.write_json(root / "linked" / "x.json", {})
    assert list((tmp_path / "other").iterdir()) == []


def test_a_configured_folder_that_holds_the_workspace_opens_nothing(
    only_workspace: Path,
) -> None:
    for folder in ("..", "/", str(only_workspace.parent)):
        paths.allow_outputs_under(folder)  # e.g. train.checkpoint_dir: ..
    assert paths.output_roots() == [only_workspace]
    with pytest.raises(ConfigError, match="refusing to write"):
        files.write_json("../x.json", {})


def test_a_stage_refuses_an_output_folder_linked_out_of_the_workspace_before_it_trains(
    finished: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(paths, "_CONFIGURED", {})  # as in a real process
    elsewhere = tmp_path / "elsewhere"
    shutil.move(finished / "models", elsewhere)
    (finished / "models").symlink_to(elsewhere)
    before = _contents(elsewhere)
    assert cli.main(["train", "--experiment", "small"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        f"deepopt: error: refusing to write models/small/model.pt: it resolves to "
        f"{elsewhere}/small/model.pt, outside {finished}"
    )
    assert _contents(elsewhere) == before


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------
# A full disk: the previous file stays, one line says so


def _no_space(*_: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


NO_SPACE = "no space left on device (its previous version is unchanged); free some space and"


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_keeps_the_previous_file_and_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    target = tmp_path / "out" / "result"
    target.parent.mkdir()
    target.write_bytes(b"previous")
    monkeypatch.setattr(os, "fsync", _no_space)  # where the data meets the disk
    with pytest.raises(files.WriteError) as caught:
        WRITERS[writer](target)
    assert str(caught.value) == f"cannot write {target}: {NO_SPACE} run this again"
    assert caught.value.errno == errno.ENOSPC and caught.value.exit_code == 1
    assert isinstance(caught.value, DeepoptError) and isinstance(caught.value, OSError)
    assert target.read_bytes() == b"previous"
    assert os.listdir(target.parent) == ["result"]  # the temp file is gone


class _FullDisk:
    """A file whose every write() finds the disk full (as torch.save's own writes would)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def write(self, data: bytes) -> int:
        _no_space()
        return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *_: object) -> None:
        self._handle.close()


def test_a_full_disk_inside_torch_save_and_a_new_file_are_one_line_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = open
    monkeypatch.setattr(files, "open", lambda *a, **k: _FullDisk(real_open(*a, **k)), raising=False)
    target = tmp_path / "out" / "checkpoint.pt"
    with pytest.raises(files.WriteError) as caught:
        files.write_torch(target, {"weights": torch.zeros(1000)})
    assert str(caught.value) == (
        f"cannot write {target}: no space left on device (it was not created); free some "
        "space and run this again"
    )
    assert os.listdir(target.parent) == []


def test_a_write_that_fails_otherwise_names_the_file_and_the_reason(tmp_path: Path) -> None:
    target = tmp_path / "out" / "taken"
    (target / "inside").mkdir(parents=True)  # the rename onto a folder fails
    with pytest.raises(files.WriteError) as caught:
        files.write_text(target, "x")
    assert str(caught.value) == f"cannot write {target}: Is a directory"
    assert os.listdir(target.parent) == ["taken"]


def test_train_on_a_full_disk_exits_1_in_one_line_and_keeps_the_previous_model(
    finished: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _contents(finished)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the disk fills up when model.pt is written
        if ".model.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            _no_space()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert cli.main(["train", "--experiment", "small"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"deepopt: error: cannot write models/small/model.pt: {NO_SPACE} run this again"
    )
    assert "Traceback" not in err
    after = _contents(finished)
    assert not [name for name in after if name.endswith(".tmp")]
    assert {k: v for k, v in after.items() if not k.startswith("checkpoints/")} == {
        k: v for k, v in before.items() if not k.startswith("checkpoints/")
    }


# In a mount namespace of its own: a tmpfs just big enough for models/small/ and its files,
# filled up; then `deepopt train` rewrites model.pt there. Prints what the test checks.
_ON_A_FULL_TMPFS = r"""
set -e
keep=$(mktemp -d)
cp -a models/small/. "$keep"/
mount -t tmpfs -o size=$(( $(du -sk "$keep" | cut -f1) + 64 ))k deepopt-full models/small
cp -a "$keep"/. models/small/
head -c 1G /dev/zero > models/small/filler 2>/dev/null || true
set +e
"$1" -m deepopt.cli train --experiment small 2> "$keep/stderr"
echo "exit $?"
cmp -s "$keep/model.pt" models/small/model.pt && echo "model.pt unchanged"
ls -A models/small | tr '\n' ' '; echo
tail -n 1 "$keep/stderr"
"""


def _namespace_with_mounts(folder: Path) -> list[str] | None:
    """An unshare command that may mount a tmpfs (None: this machine does not allow it)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for command in ([unshare, "--user", "--map-root-user", "--mount"], [unshare, "--mount"]):
        probe = f"mount -t tmpfs -o size=4k none {folder}"
        done = subprocess.run([*command, "sh", "-c", probe], capture_output=True, check=False)
        if done.returncode == 0:
            return command
    return None


@pytest.mark.slow
def test_train_on_a_real_full_file_system_keeps_the_previous_model(finished: Path) -> None:
    namespace = _namespace_with_mounts(finished / "models")
    if namespace is None:
        pytest.skip("no mount namespace here for a small tmpfs (the injected ENOSPC still ran)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    done = subprocess.run(
        [*namespace, "sh", "-c", _ON_A_FULL_TMPFS, "sh", sys.executable],
        cwd=finished,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = done.stdout.splitlines()
    assert lines[:2] == ["exit 1", "model.pt unchanged"], done.stdout + done.stderr
    assert sorted(lines[2].split()) == ["filler", "model.pt", "run.json"]  # no temp file
    assert (
        lines[3] == f"deepopt: error: cannot write models/small/model.pt: {NO_SPACE} run this again"
    )


# ---------------------------------------------------------------------------------------
# Lock files: one process at a time, never one waiting for itself

_HOLD = r"""
import sys, time
from deepopt import files
with files.exclusive(sys.argv[1], "training small seed 7", "cannot train small into ckpt"):
    print("held", flush=True)
    time.sleep(120)
"""

_TRY = r"""
import sys
from deepopt import files
try:
    with files.exclusive(sys.argv[1], "training small seed 8", "cannot train small into ckpt"):
        print("acquired")
except files.LockedError as err:
    print(err)
"""

BUSY = "cannot train small into ckpt: another deepopt process (pid {pid}: training small seed {seed}) is using it; wait for it to finish or stop it, then run this again"  # noqa: E501


def _python(code: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _holder(lock: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock)],
        cwd=lock.parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_lock_refuses_another_process_at_once_and_dies_with_its_holder(
    tmp_path: Path,
) -> None:
    lock = tmp_path / "ckpt" / "deepopt.lock"
    holder = _holder(lock)
    try:
        with (
            pytest.raises(files.LockedError) as caught,
            files.exclusive(lock, "h", "cannot train small into ckpt"),
        ):
            pass
        assert str(caught.value) == BUSY.format(pid=holder.pid, seed=7)
        assert caught.value.exit_code == 1
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the kernel releases its lock
        holder.wait()
    with files.exclusive(lock, "training small seed 9", "busy"):
        assert lock.read_text() == f"pid {os.getpid()}: training small seed 9\n"
    assert lock.read_text() == ""  # released: no stale holder left to quote


def test_a_process_takes_its_own_lock_again_and_others_get_it_once_released(
    tmp_path: Path,
) -> None:
    lock = tmp_path / "ckpt" / "deepopt.lock"
    with files.exclusive(lock, "training small seed 7", "busy"):
        with files.exclusive(tmp_path / "ckpt" / ".." / "ckpt" / "deepopt.lock", "again", "busy"):
            pass  # the same lock, re-entered: a stage and its train_tracked never deadlock
        assert _python(_TRY, str(lock), cwd=tmp_path) == BUSY.format(pid=os.getpid(), seed=7)
    assert _python(_TRY, str(lock), cwd=tmp_path) == "acquired"


def test_a_waiting_lock_waits_for_its_holder(tmp_path: Path) -> None:
    # tune's claim lock: workers queue for it instead of failing.
    from deepopt.tuning.storage import ClaimLock

    lock = tmp_path / "ckpt" / "claim.lock"
    holder = _holder(lock)
    started = time.monotonic()
    killer = subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {holder.pid}"])
    with ClaimLock(lock):
        waited = time.monotonic() - started
    holder.wait()
    killer.wait()
    assert waited >= 0.8


# ---------------------------------------------------------------------------------------
# The one guarded torch.load


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
