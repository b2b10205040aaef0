"""A fuzzer over params.yaml: mutations of the repository's own params.yaml (values replaced by
other types and edge values, keys dropped, renamed or added at every level, sections
swapped) run through the real CLI in-process, `deepopt train --experiment small` on the tiny
prepared data. Every example must end with exit 0, 1, 2 or 3, print no traceback, at most
one line (`deepopt: error: ...`) besides the progress lines when it fails, change nothing
when it is a config error (exit 2), and write nothing outside the workspace.

`make test` runs a few hundred examples; `pytest tests/system/test_fuzz_params.py
--hypothesis-profile=long -s` runs thousands (the profile is in tests/conftest.py) and
prints how many ended with each exit code and how long they took.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepopt import cli

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = max(300, settings().max_examples)  # the long profile asks for more
PROGRESS = re.compile(r"^\[[^\]]*\] epoch \d+/\d+ ")  # a training progress line

Node = tuple[Any, ...]  # a path into the document: keys and list indices


def base_document(real: dict[str, Any]) -> dict[str, Any]:
    """The repository's params.yaml, every section and experiment kept, with the base run
    shrunk to the tiny prepared data (the workspace fixture's) and to one short epoch."""
    doc = copy.deepcopy(real)
    doc["data"]["train_subset"] = 500  # conftest.TINY_SUBSET: the prepared data's
    doc["model"].update(conv_channels=[4, 8, 8], dense_units=16)
    doc["train"].update(epochs=1, threads=1)
    doc["mlflow"]["log_model"] = False
    doc["experiments"]["small"] = {}
    return doc


with open(REPO / "params.yaml", encoding="utf-8") as handle:
    BASE = base_document(yaml.safe_load(handle))


def nodes(value: Any, path: Node = ()) -> Iterator[Node]:
    """Every key and list entry below ``value``, parents first."""
    for key, child in _children(value):
        yield (*path, key)
        yield from nodes(child, (*path, key))


def _children(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, dict):
        return list(value.items())
    return list(enumerate(value)) if isinstance(value, list) else []


NODES = list(nodes(BASE))
KEYS = sorted({str(n[-1]) for n in NODES if isinstance(n[-1], str)})

# Where a name or a path would escape: checked after every example (see `outside`).
ESCAPES = ["../x", "../../escape", "../../../escape", "a/b", "/tmp/deepopt-fuzz-escape", ".."]
EDGES: list[Any] = [
    *(0, -1, 1, 2, 0.5, -0.5, 1e-300, 1e300, -1e300, math.nan, math.inf, -math.inf),
    *(2**31, 2**63, -(2**63), 2**64, 10**30),
    *(True, False, None, "", " ", "x", "1", "nan", "inf", "1e300", "null", "true", "0x10"),
    *([], [0], [1, 2, 3], [[]], {}, {"x": 1}, {"name": "sgd"}),
    *ESCAPES,
]
values = st.one_of(
    st.sampled_from(EDGES),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(-2, 2**64), max_size=4),
)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(["", "x", "0", *ESCAPES]), st.integers())
operation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(NODES), values),
    st.tuples(st.just("drop"), st.sampled_from(NODES)),
    st.tuples(st.just("rename"), st.sampled_from(NODES), keys),
    st.tuples(st.just("add"), st.sampled_from([(), *NODES]), keys, values),
    st.tuples(st.just("swap"), st.sampled_from(NODES), st.sampled_from(NODES)),
)
MUTATIONS = st.lists(operation, min_size=1, max_size=3)


def _get(doc: Any, path: Node) -> tuple[Any, Any] | None:
    """(container, key) of ``path`` in ``doc`` when it is still there."""
    node = doc
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    if isinstance(node, dict) and path[-1] in node:
        return node, path[-1]
    if isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
        return node, path[-1]
    return None


def mutate(doc: dict[str, Any], operations: list[tuple[Any, ...]]) -> dict[str, Any]:
    """``doc`` after the operations; one whose path no longer exists does nothing."""
    doc = copy.deepcopy(doc)
    for kind, path, *args in operations:
        if kind == "add":
            parent = _get(doc, path) if path else None
            target = parent[0][parent[1]] if parent is not None else doc if not path else None
            if isinstance(target, dict):
                target[args[0]] = copy.deepcopy(args[1])
            continue
        found = _get(doc, path)
        if found is None:
            continue
        container, key = found
        if kind == "set":
            container[key] = copy.deepcopy(args[0])
        elif kind == "drop":
            del container[key]
        elif kind == "rename" and isinstance(container, dict):
            container[args[0]] = container.pop(key)
        elif kind == "swap":
            other = _get(doc, args[0])
            if other is not None and other != found:
                here, there = container[key], other[0][other[1]]
                container[key], other[0][other[1]] = copy.deepcopy(there), copy.deepcopy(here)
    _keep_configured_folders_inside(doc)
    return doc


# Keys that name folders the user configures (train.checkpoint_dir, data.root, ...): outputs
# may go there by design wherever they point, so an escape drawn for one becomes "x".
FOLDER_KEYS = {"checkpoint_dir", "root", "weights", "storage"}


def _keep_configured_folders_inside(value: Any) -> None:
    for key, child in _children(value):
        if key in FOLDER_KEYS and isinstance(child, str) and (".." in child or child[:1] == "/"):
            value[key] = "x"
        else:
            _keep_configured_folders_inside(child)


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder``: size and modification time (cheap enough per example)."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.exists()
    }


def outside(work: Path) -> set[str]:
    """What lies beside the workspace and beside its folder (this test session's own
    folders: where the relative escapes lead), and whether the absolute escape exists."""
    seen = {str(p) for p in work.parent.iterdir() if p.name not in {"work", "mlruns"}}
    seen |= {str(p) for p in work.parent.parent.iterdir() if p != work.parent}
    return seen | {p for p in ["/tmp/deepopt-fuzz-escape"] if Path(p).exists()}


def test_mutated_params_end_with_a_known_exit_and_one_line(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work = workspace()
    store = work.parent / "mlruns"
    codes: Counter[int] = Counter()
    slowest = 0.0
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(operations=MUTATIONS)
    def example(operations: list[tuple[Any, ...]]) -> None:
        nonlocal slowest
        doc = mutate(BASE, operations)
        (work / "params.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
        before, beside = files(work), outside(work)
        stored = files(store)
        capsys.readouterr()
        tic = time.monotonic()
        code = cli.main(["train", "--experiment", "small"])
        slowest = max(slowest, time.monotonic() - tic)
        err = capsys.readouterr().err
        codes[code] += 1
        assert code in {0, 1, 2, 3}, err
        assert "Traceback" not in err, err
        if code != 0:
            lines = [line for line in err.splitlines() if not PROGRESS.match(line)]
            assert len(lines) == 1 and lines[0].startswith("deepopt: error: "), err
        if code == 2:  # a config error: nothing written, in the workspace or the store
            assert files(work) == before, err
            assert files(store) == stored, err
        assert outside(work) == beside, (operations, err)

    example()
    seconds = time.monotonic() - started
    print(
        f"\nfuzz: {sum(codes.values())} examples in {seconds:.0f} s (slowest {slowest:.1f} s),"
        f" exit codes {dict(sorted(codes.items()))}"
    )
    assert codes[2] > 0 and codes[0] + codes[1] + codes[3] > 0  # both sides were reached
