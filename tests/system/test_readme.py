"""Every shell command in README.md works as written, in a fresh clone, on tiny data.

The commands are the lines of the README's ```bash / ```sh / ```console blocks. Each is
either run here (``RUN``), a dvc.yaml stage's own command that the test's ``dvc repro``
runs (``AS_STAGES``), or listed in ``NOT_RUN`` with the reason; a command in none of them
(a new one in the README), or an entry the README no longer has, fails the test.

The clone is ``git clone`` of HEAD plus the working tree's uncommitted changes (what the
next commit holds), with the tiny params of the other system tests. It has no virtualenv
of its own: its ``.venv`` is a link to the one running the tests, and its ``src`` comes
first on PYTHONPATH, so ``source .venv/bin/activate`` runs this clone's code. Every
command runs in bash after that line, with the venv taken off the inherited PATH: a
command that needs the venv works only because the README activates it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, tiny_params
from deepopt.data import DEBIAN_FASHION_MNIST

pytestmark = pytest.mark.slow

README = REPO / "README.md"
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```", re.M | re.S)
ACTIVATE = "source .venv/bin/activate"
TERMINAL_COLUMNS = 80  # the README's `dvc exp show` fits a classic terminal (50 here)
VARIANT = "adam-lr-0.001"  # the README's `dvc exp run -n` name
EXP_SHOW = r"dvc exp show --drop '.*' --keep 'Experiment$|test_acc\.bn_adam$'"
METRICS_DIFF = "dvc metrics diff baseline adam-lr-0.001 --targets summary.json --all"
PARAMS_DIFF = "dvc params diff baseline adam-lr-0.001"
LR_FIND_BN_ADAM = "deepopt lr-find --experiment bn_adam"
TRIALS = "optuna trials --study-name <study> --storage sqlite:///optuna.db"

# Run in the clone in README order, after `dvc repro` (make repro's last step, on tiny data).
RUN = (
    ACTIVATE,
    "dvc exp save -n baseline dvc.yaml",
    "dvc exp run -n adam-lr-0.001 -S 'experiments.bn_adam.optim.lr=0.001'",
    EXP_SHOW,
    METRICS_DIFF,
    PARAMS_DIFF,
    LR_FIND_BN_ADAM,
    "dvc plots show lr_find/base.csv",
    "optuna studies --storage sqlite:///optuna.db",
    TRIALS,
)
# Exactly the `cmd` of a dvc.yaml stage: the clone's `dvc repro` runs each (checked below).
AS_STAGES = (
    "deepopt lr-find",
    "deepopt tune",
    "deepopt train --experiment train_best --overrides params/best.yaml",
)
NOT_RUN = {
    "make repro": "make setup (pip into .venv) and the full pipeline, 22 min; the test runs "
    "its last step, dvc repro, on tiny params",
    "make test": "the whole test suite, this test included",
    "make ui": "a server that runs until stopped; tests/system/test_mlflow_server.py runs "
    "MLflow's server",
    "deepopt tune --n-trials 50": "50 trials take minutes even on tiny data; deepopt tune "
    "itself runs as the tune stage",
    "optuna-dashboard sqlite:///optuna.db": "a server that runs until stopped",
    "optuna-dashboard sqlite:///compare/optuna.db": "a server that runs until stopped",
    "dvc repro compare/dvc.yaml": "seven studies and 70 seeds, over an hour here (README); "
    "tests/compare/test_compare_pipeline.py runs it on tiny data with two optimizers",
    "python benchmarks/bench_train.py": "a 12-minute measurement; tests/system/test_bench.py "
    "runs the script on tiny data",
    "python benchmarks/bench_train.py --quick": "a minute of timed epochs on the real data; "
    "tests/system/test_bench.py runs --quick on tiny data",
    "python benchmarks/bench_stages.py": "a measurement: minutes of interleaved stage runs",
    "python benchmarks/stage_breakdown.py": "a measurement of a real train and evaluate stage",
    "python benchmarks/bench_log_model.py": "a measurement; tests/system/test_bench.py runs "
    "the script with 2 pairs",
}


def _without_comment(line: str) -> str:
    """The line up to a `#` that starts a shell comment (outside quotes, after a blank)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_commands(text: str) -> list[str]:
    """The README's shell commands in order: one a line, continuations joined, `$ ` and
    comments dropped."""
    commands = []
    for block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            command = _without_comment(line.strip().removeprefix("$ ")).strip()
            if command:
                commands.append(command)
    return commands


def test_commands_are_found_in_fenced_blocks_without_their_comments() -> None:
    text = "```bash\nmake repro   # all\n$ dvc exp show \\\n  --md\n```\n```\nnot a command\n```\n"
    assert readme_commands(text) == ["make repro", "dvc exp show    --md"]
    assert _without_comment("dvc exp run -S 'a=#1' # why") == "dvc exp run -S 'a=#1' "


def test_every_readme_command_is_run_or_listed_with_its_reason() -> None:
    commands = readme_commands(README.read_text(encoding="utf-8"))
    classified = [*RUN, *AS_STAGES, *NOT_RUN]
    assert len(classified) == len(set(classified))
    unclassified = sorted(set(commands) - set(classified))
    assert not unclassified, f"README commands neither run here nor in NOT_RUN: {unclassified}"
    stale = sorted(set(classified) - set(commands))
    assert not stale, f"no longer in the README: {stale}"
    # Activation comes before any command that needs the venv (make targets do not).
    first = next(c for c in commands if not c.startswith("make "))
    assert first == ACTIVATE
    # The README order is the order RUN runs them in (each needs the ones before).
    assert [c for c in commands if c in RUN] == list(RUN)


def test_the_commands_run_as_stages_are_stage_commands_of_dvc_yaml() -> None:
    with open(REPO / "dvc.yaml", encoding="utf-8") as handle:
        commands = {stage.get("cmd") for stage in yaml.safe_load(handle)["stages"].values()}
    assert set(AS_STAGES) <= commands


def _shell_env(clone: Path) -> dict[str, str]:
    """The inherited environment without the venv on PATH (the README's activation puts it
    there), the clone's src first, and a git identity for `dvc exp`'s commits."""
    venv_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    return {
        **env,
        "PATH": os.pathsep.join(path),
        "PYTHONPATH": str(clone / "src"),
        "DVC_NO_ANALYTICS": "1",
        "COLUMNS": "1000",  # rich collapses columns to fit; measure the table's own width
        "GIT_AUTHOR_NAME": "deepopt test",
        "GIT_AUTHOR_EMAIL": "test@deepopt.invalid",
        "GIT_COMMITTER_NAME": "deepopt test",
        "GIT_COMMITTER_EMAIL": "test@deepopt.invalid",
    }


def _bash(command: str, clone: Path, env: dict[str, str]) -> str:
    script = f"set -euo pipefail\n{ACTIVATE}\n{command}\n"
    start = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    print(f"{time.monotonic() - start:6.1f} s  {command}")  # shown with -s or on a failure
    assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _git(*argv: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *argv], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


def _git_state(clone: Path) -> tuple[set[str], str]:
    """`git status` lines and the diff of the tracked files against HEAD."""
    return set(_git("status", "--porcelain", cwd=clone).splitlines()), _git("diff", cwd=clone)


def _fresh_clone(clone: Path) -> None:
    """HEAD, then the working tree's modified, deleted and untracked (not ignored) files."""
    _git("clone", "-q", str(REPO), str(clone), cwd=REPO.parent)
    changed = _git("ls-files", "-z", "--modified", "--others", "--exclude-standard", cwd=REPO)
    deleted = set(_git("ls-files", "-z", "--deleted", cwd=REPO).split("\0"))
    for name in filter(None, changed.split("\0")):
        if name in deleted:
            (clone / name).unlink(missing_ok=True)
        else:
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)


def _experiments_stages_read(dvc_yaml: Path) -> set[str]:
    """Experiments whose outputs a stage outside the foreach lists as deps by name (the
    figures stage reads the vanishing_* runs): `dvc repro` needs them in params.yaml."""
    with open(dvc_yaml, encoding="utf-8") as handle:
        stages = yaml.safe_load(handle)["stages"]
    deps = [d for s in stages.values() if "foreach" not in s for d in s.get("deps", [])]
    named = (re.match(r"(?:models|metrics|plots)/([^/$]+)/", str(d)) for d in deps)
    return {m.group(1) for m in named if m} - {"train_best"}  # the tune stage makes that one


def _tiny_project(clone: Path, base_params: dict[str, Any]) -> None:
    params = tiny_params(
        base_params,
        train={"epochs": 1},
        mlflow={"log_model": False},
        # epochs 3: the search space draws a cosine warmup of up to 2 epochs
        tune={"n_trials": 1, "epochs": 3, "workers": 1, "pruner": "none", "startup_trials": 1},
    )
    experiments = base_params["experiments"]
    needed = sorted(_experiments_stages_read(clone / "dvc.yaml"))
    params["experiments"] = {name: experiments[name] for name in ["bn_adam", *needed]}
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), "utf-8")
    (clone / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    with open(clone / ".git" / "info" / "exclude", "a", encoding="utf-8") as handle:
        handle.write(".venv\n")  # a link, which .gitignore's `.venv/` does not match


def _study_name(clone: Path, env: dict[str, str]) -> str:
    listed = _bash("optuna studies --storage sqlite:///optuna.db -f value", clone, env)
    (name,) = {line.split()[0] for line in listed.splitlines() if line.strip()}
    return name


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.-])\d+\.\d+(?![\w.])", line)]


@pytest.mark.timeout(1200)  # ~4 min here with another job on the cores: 15 stages' start-up
def test_readme_commands_run_as_written_in_a_fresh_clone(
    tmp_path: Path, base_params: dict[str, Any]
) -> None:
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{DEBIAN_FASHION_MNIST} is missing: run `make setup`")
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip("not run from a virtualenv (make setup makes .venv)")
    clone = tmp_path / "clone"
    _fresh_clone(clone)
    _tiny_project(clone, base_params)
    env = _shell_env(clone)

    found = _bash("command -v deepopt dvc mlflow optuna python", clone, env).split()
    venv_bin = (clone / ".venv" / "bin").resolve()
    assert [Path(p).parent.resolve() for p in found] == [venv_bin] * 5, found
    code = _bash("python -c 'import deepopt; print(deepopt.__file__)'", clone, env)
    assert Path(code.strip()).is_relative_to(clone / "src"), code

    before = _git_state(clone)
    _bash("dvc repro", clone, env)  # what `make repro` does once make setup is done
    lock = yaml.safe_load((clone / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    ran = {stage["cmd"] for stage in lock.values()}
    assert set(AS_STAGES) <= ran
    # .gitignore covers every output: the pipeline changes no tracked file (DVC would add
    # an output missing there to .gitignore) and leaves git only its dvc.lock to commit.
    after = _git_state(clone)
    assert after[1] == before[1], "dvc repro changed tracked files"
    assert after[0] - before[0] == {"?? dvc.lock"}, after[0] - before[0]

    outputs = {}
    for command in RUN[1:]:
        filled = command
        if "<study>" in command:  # the one placeholder: the study the tune stage made
            filled = command.replace("<study>", _study_name(clone, env))
        outputs[command] = _bash(filled, clone, env)
    # Nor do the commands leave files for git to list (dvc plots show writes dvc_plots/).
    assert _git_state(clone)[0] - before[0] == {"?? dvc.lock"}

    table = outputs[EXP_SHOW].splitlines()
    assert max(map(len, table)) <= TERMINAL_COLUMNS, "\n".join(table)
    header = next(line for line in table if "Experiment" in line)
    assert header.split() == ["Experiment", "test_acc.bn_adam"], header
    rows = {
        name: _numbers(line) for line in table for name in ("baseline", VARIANT) if name in line
    }
    assert all(len(values) == 1 for values in rows.values()) and len(rows) == 2, table

    diff = [line for line in outputs[METRICS_DIFF].splitlines() if "test_acc.bn_adam" in line]
    assert len(diff) == 1 and _numbers(diff[0])[:2] == [rows["baseline"][0], rows[VARIANT][0]]
    params = outputs[PARAMS_DIFF]
    assert re.search(r"experiments\.bn_adam\.optim\.lr\s+0\.01\s+0\.001", params), params
    trials = outputs[TRIALS]
    assert "number" in trials and "COMPLETE" in trials, trials
