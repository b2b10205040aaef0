"""The package's layering rules (pyproject's [tool.importlinter]) and what an import graph
cannot see: no I/O in models/ but weights.py, no module over 400 lines."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "deepopt"
MAX_LINES = 400


def test_the_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    done = subprocess.run(
        [lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


# Calls that read or write files or the network.
_IO_CALLS = (
    "open",
    "torch.load",
    "torch.save",
    "urlopen",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
    "load_state_dict_from_url",
    "download_url_to_file",
)


def test_models_do_no_io_but_weights_py() -> None:
    for source in sorted((PACKAGE / "models").glob("*.py")):
        if source.name == "weights.py":
            continue
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert not name.endswith(_IO_CALLS), f"models/{source.name}:{node.lineno}: {name}"


def test_no_module_is_over_400_lines() -> None:
    sources = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))
    long = {
        str(path.relative_to(REPO)): lines
        for path in sources
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, long


def test_every_module_says_what_it_is_for() -> None:
    for source in sorted(PACKAGE.rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8")))
        assert docstring, f"{source.relative_to(REPO)} has no module docstring"
