"""reports/index.html from `deepopt report` on tiny hand-written metrics, plots and run.json
files in tmp_path (the data contract of train and evaluate; no training): every figure
inline, the same numbers as lecture.md, text escaped, runs linked, same bytes twice."""

from __future__ import annotations

import base64
import csv
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from deepopt import reporting
from deepopt.config import Params, parse_params
from deepopt.errors import DataError
from deepopt.files import write_json
from deepopt.reporting import Image, SourceState
from deepopt.stages import report

PAGE = Path("reports/index.html")
LAYERS = ("dense1", "dense2", "logits")  # forward order
EXPERIMENTS: dict[str, Any] = {
    "bn_sgd_earlystop": {},
    "nobn": {"model": {"batchnorm": False}, "train": {"diagnostics": True}},
}
NOBN_ACC = [0.850, 0.861, 0.842]
HOSTILE = '<img src=x onerror="alert(1)">&'  # a stop reason no page may run as markup


class _Page(HTMLParser):
    """The tags a test looks at: images, links (with their text) and table cells."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.links: list[tuple[str, str]] = []
        self.scripts = 0
        self.cells: list[str] = []
        self._href: str | None = None
        self._link_text = ""
        self._cell: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "a":
            self._href, self._link_text = dict(attrs)["href"], ""
        elif tag == "script":
            self.scripts += 1
        elif tag == "td":
            self._cell = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, self._link_text))
            self._href = None
        elif tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._link_text += data
        if self._cell is not None:
            self._cell += data


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _history(epochs: int, diagnostics: bool) -> list[dict[str, Any]]:
    rows = []
    for e in range(epochs):
        row: dict[str, Any] = {"epoch": e, "loss": 1 / (e + 1), "acc": 0.5}
        row |= {"val_loss": 1.2 / (e + 1), "val_acc": 0.6, "lr": 0.02 / (1 + e)}
        if diagnostics:
            row |= {f"grad_norm/{layer}": 10.0**i for i, layer in enumerate(LAYERS)}
            row |= {f"zero_fraction/{layer}": 0.6 for layer in LAYERS[:-1]}
        rows.append(row)
    return rows


def write_experiment(name: str, test_acc: list[float], *, stop: str = "max_epochs") -> None:
    """train.json, eval.json, history.csv and runs.csv of ``len(test_acc)`` replicas."""
    diagnostics = "diagnostics" in EXPERIMENTS.get(name, {}).get("train", {})
    runs = [
        {"seed": 4487 + r, "replica": r, "member": 0, "epochs_run": 3, "stop_reason": stop}
        | {"best_val_acc": 0.8 + r / 100, "final_loss": 0.4, "train_seconds": 2.0}
        for r in range(len(test_acc))
    ]
    write_json(Path("metrics", name, "train.json"), {**runs[0], "runs": runs})
    evaluation = {
        "test_acc": sum(test_acc) / len(test_acc),
        "test_loss": 0.4,
        "runs": [{"replica": r, "test_acc": a} for r, a in enumerate(test_acc)],
    }
    write_json(Path("metrics", name, "eval.json"), evaluation)
    history = _history(3, diagnostics)
    _write_csv(Path("plots", name, "history.csv"), history)
    _write_csv(
        Path("plots", name, "runs.csv"),
        [
            {"replica": r, "member": 0, "seed": 4487 + r, **row}
            for r in range(len(test_acc))
            for row in history
        ],
    )


def write_run_info(name: str, experiment_id: str, run_ids: list[str], parent: str | None) -> None:
    """models/<name>/run.json as train writes it (training.outputs.run_info)."""
    info: dict[str, Any] = {
        "experiment": name,
        "mlflow_experiment_id": experiment_id,
        "runs": [
            {"seed": 4487 + r, "replica": r, "index": 0, "run_id": run_id}
            for r, run_id in enumerate(run_ids)
        ],
    }
    if parent is not None:
        info["parent_run_id"] = parent
    write_json(Path("models", name, "run.json"), info)


@pytest.fixture()
def matrix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_params: dict[str, Any]) -> Params:
    """Two experiments of three replicas (one with diagnostics), run.json for the first."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    write_json(Path("data/prepared/meta.json"), {"dataset": "fashion-mnist", "digest": "ab" * 32})
    write_experiment("bn_sgd_earlystop", [0.881, 0.872, 0.879], stop=HOSTILE)
    write_experiment("nobn", NOBN_ACC)
    write_run_info("bn_sgd_earlystop", "7", ["run-a0", "run-a1", "run-a2"], "parent-a")
    raw = {**base_params, "experiments": EXPERIMENTS}
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return parse_params(raw)


def _page() -> _Page:
    return _Page(PAGE.read_text(encoding="utf-8"))


def test_every_figure_the_report_drew_is_inline_with_the_same_bytes(matrix: Params) -> None:
    summary = report.main(matrix)
    assert summary["html"] == str(PAGE)
    embedded = []
    for image in _page().images:
        src = image["src"] or ""
        assert src.startswith("data:image/png;base64,"), src[:40]  # nothing fetched
        embedded.append(base64.b64decode(src.split(",", 1)[1]))
    drawn = [Path(plot).read_bytes() for plot in summary["plots"]]
    assert len(drawn) >= 4  # val_loss, lr and nobn's diagnostics: grad norms, zero fraction
    assert embedded == drawn  # in the report's figure order


def _markdown_cells(markdown: str) -> list[str]:
    """The body cells of lecture.md's tables (headers and separator rows left out)."""
    lines = markdown.splitlines()
    cells = []
    for i, line in enumerate(lines):
        header = i + 1 < len(lines) and lines[i + 1].startswith("|---")
        if line.startswith("|") and not line.startswith("|---") and not header:
            cells += [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
    return cells


def test_the_tables_show_the_numbers_of_lecture_md(matrix: Params) -> None:
    report.main(matrix)
    markdown = _markdown_cells(Path("reports/lecture.md").read_text(encoding="utf-8"))
    numbers = [cell for cell in markdown if any(c.isdigit() for c in cell) and "`" not in cell]
    assert len(numbers) > 20  # the results and the claims tables
    cells = set(_page().cells)
    assert [cell for cell in numbers if cell not in cells] == []  # formatted once, for both
    assert "0.8510 ± 0.0237" in cells  # nobn's mean ± t half-width over its 3 replicas


def test_text_from_the_files_is_escaped(matrix: Params) -> None:
    report.main(matrix)
    page = _page()
    assert page.scripts == 0
    assert len(page.images) == 4  # the report's figures only: the stop reason is no <img>
    assert HOSTILE in page.cells  # shown as text, whole
    assert HOSTILE not in PAGE.read_text(encoding="utf-8")


def test_each_run_links_to_its_mlflow_page_with_its_id_as_text(matrix: Params) -> None:
    report.main(matrix)
    links = dict(_page().links)
    base = "http://127.0.0.1:5000/#/experiments/7"
    for run_id in ("parent-a", "run-a0", "run-a1", "run-a2"):
        assert links[f"{base}/runs/{run_id}"] == run_id
    assert links[base] == "7"
    text = PAGE.read_text(encoding="utf-8")
    assert "<code>train@bn_sgd_earlystop</code>, <code>evaluate@bn_sgd_earlystop</code>" in text
    # nobn has no run.json here (metrics copied without models/): said, not invented
    assert "no <code>models/nobn/run.json</code>" in text


def test_the_page_links_the_compare_and_transfer_reports(matrix: Params) -> None:
    report.main(matrix)
    links = dict(_page().links)
    assert links["../compare/report.html"] == "Which optimizer is best?"
    assert links["../transfer/report.md"] == "Transfer learning"


def test_runs_on_a_tracking_server_link_to_that_server(
    matrix: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5001/")
    report.main(matrix)
    hrefs = [href for href, _ in _page().links]
    assert "http://mlflow.example:5001/#/experiments/7/runs/run-a0" in hrefs
    assert not any(href.startswith(reporting.MLFLOW_UI) for href in hrefs)


def test_a_damaged_run_json_is_a_data_error_and_nothing_is_written(matrix: Params) -> None:
    Path("models/nobn").mkdir(parents=True)
    Path("models/nobn/run.json").write_text('{"runs": [{"run_id": 3}]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"models/nobn/run\.json"):
        report.main(matrix)
    assert not PAGE.exists() and not Path("reports/lecture.md").exists()


def test_the_page_names_the_git_commit_it_was_built_at(matrix: Params) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "params"], check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    report.main(matrix)
    assert f"git commit <code>{commit}</code> (clean)" in PAGE.read_text(encoding="utf-8")


def test_inside_dvc_exp_run_the_page_names_the_experiment(
    matrix: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-dace")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abc")
    report.main(matrix)
    text = PAGE.read_text(encoding="utf-8")
    assert "DVC experiment <code>sunny-dace</code> from baseline <code>0123abc</code>" in text
    assert "<code>dvc exp apply sunny-dace</code>" in text


def test_second_run_gives_a_byte_identical_page(matrix: Params) -> None:
    report.main(matrix)
    first = PAGE.read_bytes()
    PAGE.unlink()
    report.main(matrix)
    assert PAGE.read_bytes() == first


def _png(tmp_path: Path, name: str) -> bytes:
    from matplotlib.figure import Figure

    from deepopt.figures import png_bytes

    def build() -> Figure:
        figure = Figure(figsize=(2, 1))
        figure.add_subplot().plot([0, 1], [1, 0])
        return figure

    blob = png_bytes(build)
    (tmp_path / name).write_bytes(blob)
    return blob


def test_lecture_figures_are_inline_and_a_missing_one_is_noted(tmp_path: Path) -> None:
    first, second = _png(tmp_path, "a.png"), _png(tmp_path, "b.png")
    catalog = {
        "a": ("a.png", "The first <figure> & its caption"),
        "gone": ("gone.png", "Not drawn yet"),
        "b": ("b.png", "The second"),
    }
    images = reporting.read_images(catalog, tmp_path)
    assert [image.png for image in images] == [first, None, second]
    text = reporting.render_html(
        summaries=[],
        dataset="fashion-mnist",
        meta={"dataset": "fashion-mnist"},
        figures={},
        lecture_figures=images,
        runs={},
        experiments=[],
        source=SourceState("unknown", "unknown", None, None),
        ui_base=reporting.MLFLOW_UI,
    )
    page = _Page(text)
    sources = [base64.b64decode((image["src"] or "").split(",", 1)[1]) for image in page.images]
    assert sources == [first, second]
    assert page.images[0]["alt"] == "The first <figure> & its caption"  # unescaped by the parser
    assert "The first &lt;figure&gt; &amp; its caption" in text
    assert f"Not drawn: <code>{tmp_path / 'gone.png'}</code> is missing" in text


def test_the_stage_embeds_the_lecture_figures_the_figures_stage_drew(matrix: Params) -> None:
    from deepopt.illustrations import LECTURE_FIGURES
    from deepopt.paths import FIGURES_DIR

    (drawn_name, caption), *rest = LECTURE_FIGURES.values()
    FIGURES_DIR.mkdir()
    drawn = _png(FIGURES_DIR, drawn_name)
    summary = report.main(matrix)
    page = _Page(PAGE.read_text(encoding="utf-8"))
    embedded = [base64.b64decode((i["src"] or "").split(",", 1)[1]) for i in page.images]
    assert embedded.count(drawn) == 1 and len(embedded) == len(summary["plots"]) + 1
    assert caption in [i["alt"] for i in page.images]
    text = PAGE.read_text(encoding="utf-8")
    for file_name, _ in rest:  # not drawn here: each said so, none left out silently
        assert f"Not drawn: <code>{FIGURES_DIR / file_name}</code> is missing" in text


def test_a_figure_file_that_is_not_a_png_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("<svg/>", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.png: is not a PNG"):
        reporting.read_images({"a": ("a.png", "caption")}, tmp_path)
    (tmp_path / "b.png").mkdir()  # a folder where the figure should be: one line, no traceback
    with pytest.raises(DataError, match=r"b\.png: cannot be read"):
        reporting.read_images({"b": ("b.png", "caption")}, tmp_path)


def test_image_without_bytes_renders_no_img_tag() -> None:
    from deepopt.reporting.page import figure

    assert "<img" not in figure(Image("caption", "figures/x.png", None))


def test_the_range_test_shows_its_suggestion_and_plot_or_says_it_did_not_run(
    matrix: Params,
) -> None:
    report.main(matrix)
    assert "Not run: <code>deepopt lr-find</code>" in PAGE.read_text(encoding="utf-8")
    plot = _png(Path("."), "lr.png")
    Path("lr_find").mkdir()
    Path("lr.png").rename("lr_find/base.png")
    write_json(
        Path("lr_find/base.json"),
        {
            "experiment": "base", "optimizer": "nesterov", "batch_size": 50,
            "suggestion": 0.003, "lr_used": 0.02, "base_lr": 0.02, "batches": 100,
            "stop_reason": "num_iter", "start_lr": 1e-7, "end_lr": 10.0, "num_iter": 100,
        },
    )  # fmt: skip
    report.main(matrix)
    text = PAGE.read_text(encoding="utf-8")
    markdown = Path("reports/lecture.md").read_text(encoding="utf-8")
    row = '<tr><td>suggested by the range test (fastai&#x27;s valley)</td><td class="num">0.003'
    assert row in text
    assert "| suggested by the range test (fastai's valley) | 0.003 |" in markdown
    embedded = [base64.b64decode((i["src"] or "").split(",", 1)[1]) for i in _page().images]
    assert plot in embedded
