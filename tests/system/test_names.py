"""Names are not paths: a name from the command line, a file name or params.yaml that is not
a plain folder name stops the command with one line (exit 2) before anything is written,
inside the workspace or outside it (the issue's ``--experiment ../../../../tmp/x``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deepopt import cli
from deepopt.config import NAME_RULE

OUTSIDE = "outside"  # tmp_path/outside: where an escaping name would write


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder``: size and modification time."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
    }


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert captured.out == "" or code == 0
    return code, captured.err


def escape(work: Path) -> str:
    """A name that, joined to models/<name>/, leads to tmp_path/outside."""
    return os.path.relpath(work.parent / OUTSIDE, work / "models")


def assert_refused(
    work: Path, argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(work.parent)
    code, err = run(argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"deepopt: error: {expected}"), err
    assert snapshot(work.parent) == before  # nothing written, inside or outside


@pytest.fixture()
def overrides(workspace: Callable[..., Path]) -> Path:
    work = workspace(mlflow={"log_model": False})
    (work / "some.yaml").write_text("optim: {lr: 0.03}\n", encoding="utf-8")
    return work


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("with_overrides", [True, False])
@pytest.mark.parametrize("kind", ["relative", "absolute", "slash", "dots", "empty"])
def test_an_experiment_option_that_is_a_path_is_refused(
    overrides: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    with_overrides: bool,
    kind: str,
) -> None:
    work = overrides
    name = {
        "relative": escape(work),
        "absolute": str(work.parent / OUTSIDE),
        "slash": "a/b",
        "dots": "..",
        "empty": "",
    }[kind]
    argv = [command, "--experiment", name, *(["--overrides", "some.yaml"] * with_overrides)]
    problem = "is empty" if not name else "is not a plain name"
    assert_refused(work, argv, f"--experiment: {name!r} {problem}", capsys)
    assert not (work.parent / OUTSIDE).exists()


def test_the_issues_command_no_longer_writes_outside(
    overrides: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = overrides
    name = escape(work)  # ../../outside, as the issue's ../../../../tmp/x
    argv = ["train", "--experiment", name, "--overrides", "some.yaml"]
    code, err = run(argv, capsys)
    assert code == 2
    assert err == (
        f"deepopt: error: --experiment: {name!r} is not a plain name (names become folder "
        f"names); allowed: {NAME_RULE}\n"
    )
    assert not (work.parent / OUTSIDE).exists()


def test_an_overrides_file_name_that_is_not_a_name_is_refused(
    overrides: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = overrides
    (work / "my best.yaml").write_text("optim: {lr: 0.03}\n", encoding="utf-8")
    assert_refused(
        work,
        ["train", "--overrides", "my best.yaml"],
        "--overrides my best.yaml (its file name names the outputs; or give --experiment): "
        "'my best' is not a plain name",
        capsys,
    )


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("experiments", {"small": {}, "../../outside": {}}, "experiments: '../../outside'"),
        ("experiments", {"small": {}, "a/b": {}}, "experiments: 'a/b'"),
        ("experiments", {"small": {}, "tune": {}}, "experiments: 'tune' is reserved"),
        ("tune", {"experiment": "../small"}, "tune.experiment: '../small'"),
        ("tune", {"study_name": "../../outside"}, "tune.study_name: '../../outside'"),
    ],
)
def test_a_name_in_params_yaml_that_is_a_path_is_refused(
    workspace: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    section: str,
    values: dict[str, Any],
    expected: str,
) -> None:
    work = workspace()
    params = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
    params[section] = values if section == "experiments" else {**params[section], **values}
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    for argv in (["train", "--experiment", "small"], ["tune"], ["report"]):
        assert_refused(work, argv, f"params.yaml: {expected}", capsys)


@pytest.mark.parametrize("name", ["../../outside", "a/b", "/tmp/deepopt-study"])
def test_a_study_name_option_that_is_a_path_is_refused(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str], name: str
) -> None:
    work = workspace()
    assert_refused(
        work, ["tune", "--study-name", name], f"--study-name: {name!r} is not a plain", capsys
    )
    assert not Path("/tmp/deepopt-study").exists()


@pytest.mark.slow
def test_a_plain_name_still_trains_where_it_should(
    overrides: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = overrides
    code, err = run(["train", "--experiment", "my.run-1_b", "--overrides", "some.yaml"], capsys)
    assert code == 0, err
    assert (work / "models" / "my.run-1_b" / "model.pt").is_file()
    code, err = run(["train", "--overrides", "some.yaml", "--experiment", "small"], capsys)
    assert code == 0, err
    assert (work / "models" / "small" / "model.pt").is_file()
    assert not (work.parent / OUTSIDE).exists()
