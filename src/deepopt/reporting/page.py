"""The pieces of a self-contained HTML page (pure, but ``read_images``): escaped text and
cells, tables, figures embedded as data: URIs, and the document around them with its
inline CSS. No script and no external resource, so the page opens from disk, offline."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deepopt.errors import DataError, one_line
from deepopt.reporting.reading import REPRO

__all__ = [
    "PNG_SIGNATURE",
    "Image",
    "bullets",
    "code",
    "document",
    "figure",
    "from_markdown",
    "link",
    "num",
    "paragraph",
    "read_images",
    "table",
    "td",
    "text",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em;
  padding: 0 1em; color: #1b1b1b; background: #fff; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #c8c8c8; padding: 0.25em 0.5em; vertical-align: top; }
th { background: #f0f0f0; text-align: left; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.supported { background: #e3f4e1; }
td.contradicted { background: #fbe3e1; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e0e0e0; }
figcaption { color: #444; font-size: 0.95em; }
code { font-size: 0.92em; background: #f5f5f5; padding: 0 0.2em; }
.missing { color: #8a5a00; }
"""

_CODE_SPAN = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<file>[^)]+)\)$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")  # a cell's own | is written \|
_NUMBER_CELL = re.compile(r"^[-+−<]?\s?\d")


@dataclass(frozen=True)
class Image:
    """A figure for the page: its PNG bytes, or None when the file is not there."""

    caption: str
    source: str  # the file it was read from, shown beside it
    png: bytes | None


def read_images(catalog: Mapping[str, tuple[str, str]], folder: Path) -> list[Image]:
    """The files of ``catalog`` (key -> (file name, caption)) in ``folder``, in catalog
    order; a missing file is an Image without bytes (the page says it was not drawn), a
    file that is not a PNG or cannot be read a DataError naming it."""
    images = []
    for file_name, caption in catalog.values():
        path = folder / file_name
        try:
            png: bytes | None = path.read_bytes()
        except FileNotFoundError:
            png = None
        except OSError as err:  # a folder in its place, no permission: one line, no traceback
            raise DataError(f"{path}: cannot be read ({one_line(err)}); {REPRO}") from None
        if png is not None and not png.startswith(PNG_SIGNATURE):
            raise DataError(f"{path}: is not a PNG file; {REPRO}")
        images.append(Image(caption, str(path), png))
    return images


def text(plain: str) -> str:
    """``plain`` escaped, its markdown `code` spans as <code> (notes lecture.md shares)."""
    return _CODE_SPAN.sub(r"<code>\1</code>", html.escape(plain))


def code(plain: str) -> str:
    return f"<code>{html.escape(plain)}</code>"


def link(url: str, content: str) -> str:
    """A link to ``url`` around already-escaped ``content``."""
    return f'<a href="{html.escape(url)}">{content}</a>'


def td(content: str, css: str = "") -> str:
    """A cell of already-escaped ``content``; ``css``: its class."""
    return f'<td class="{css}">{content}</td>' if css else f"<td>{content}</td>"


def num(plain: str) -> str:
    """A right-aligned cell of a formatted number (or the missing mark)."""
    return td(html.escape(plain), "num")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table of ``td`` cells under the (plain text) ``header``."""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "\n".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def paragraph(plain: str) -> str:
    return f"<p>{text(plain)}</p>"


def bullets(items: Sequence[str]) -> str:
    return "<ul>\n" + "\n".join(f"<li>{text(item)}</li>" for item in items) + "\n</ul>"


def figure(image: Image) -> str:
    """The image inline as a data: URI with its caption and file; a note when not drawn."""
    caption = text(image.caption)
    if image.png is None:
        return (
            f'<p class="missing">Not drawn: {code(image.source)} is missing '
            f"(<code>dvc repro</code> draws it). {caption}</p>"
        )
    data = base64.b64encode(image.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(image.caption)}">'
        f"<figcaption>{caption} {code(image.source)}</figcaption></figure>"
    )


def document(title: str, body: Sequence[str]) -> str:
    """The page: ``body``'s already-escaped HTML under a head with the inline CSS."""
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            # no favicon request: from file:// it would fail and log a console error
            '<link rel="icon" href="data:,">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )


def _inline(plain: str) -> str:
    return _BOLD.sub(r"<strong>\1</strong>", text(plain))


def _cells(line: str) -> list[str]:
    cells = _CELL_SPLIT.split(line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def _table_block(lines: Sequence[str]) -> str:
    header, rows = _cells(lines[0]), [_cells(line) for line in lines[2:]]

    def cell(plain: str) -> str:
        css = "num" if _NUMBER_CELL.match(plain) else ""
        css = plain.split(" ")[0] if plain.startswith(("supported", "contradicted")) else css
        return td(_inline(plain), css)

    return table(header, [[cell(c) for c in row] for row in rows])


def from_markdown(markdown: str, images: Mapping[str, Image]) -> list[str]:
    """The page body of a report deepopt wrote in markdown (headings, paragraphs, ``- ``
    lists, pipe tables, ``**bold**``, `code` and ``![alt](file)`` images, the file one of
    ``images``, embedded): the same text as the markdown, so the two never disagree."""
    body: list[str] = []
    blocks = [b.splitlines() for b in re.split(r"\n\s*\n", markdown.strip()) if b.strip()]
    for lines in blocks:
        first = lines[0]
        heading = re.match(r"^(#{1,4}) (.*)$", first)
        image = _IMAGE.match(first.strip())
        if heading and len(lines) == 1:
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image and len(lines) == 1:
            found = images.get(image.group("file"))
            body.append(figure(found or Image(image.group("alt"), image.group("file"), None)))
        elif all(line.startswith("|") for line in lines) and len(lines) >= 2:
            body.append(_table_block(lines))
        elif all(line.startswith("- ") for line in lines):
            items = "\n".join(f"<li>{_inline(line[2:])}</li>" for line in lines)
            body.append(f"<ul>\n{items}\n</ul>")
        else:
            body.extend(f"<p>{_inline(line)}</p>" for line in lines)
    return body
