"""page.from_markdown: a report deepopt writes in markdown as the same text on one page."""

from __future__ import annotations

from deepopt.reporting import page

PNG = page.PNG_SIGNATURE + b"rest of a png"

REPORT = """# Which <optimizer>?

A paragraph with `code` and **bold**,
over two lines.

## Table

| optimizer | acc | verdict | note |
|---|---:|---|---|
| adam | 0.8675 ± 0.0017 (n = 5) | supported | a \\| b |
| sgd | < 0.001 | inconclusive at n = 5 | — |

![performance profile](profile.png)

![missing plot](other.png)

Notes:

- first *note*
- second `note`
"""


def test_every_block_of_the_markdown_becomes_its_html() -> None:
    image = page.Image("performance profile", "compare/profile.png", PNG)
    body = page.from_markdown(REPORT, {"profile.png": image})
    html = "\n".join(body)
    assert body[0] == "<h1>Which &lt;optimizer&gt;?</h1>"  # escaped
    assert "<p>A paragraph with <code>code</code> and <strong>bold</strong>,</p>" in body
    assert "<h2>Table</h2>" in body
    (table,) = [b for b in body if b.startswith("<table>")]
    assert "<th>optimizer</th><th>acc</th><th>verdict</th><th>note</th>" in table
    assert '<td class="num">0.8675 ± 0.0017 (n = 5)</td>' in table
    assert '<td class="supported">supported</td>' in table
    assert "<td>a | b</td>" in table  # an escaped pipe stays in its cell
    assert '<td class="num">&lt; 0.001</td><td>inconclusive at n = 5</td>' in table
    assert table.count("<tr>") == 3
    assert 'src="data:image/png;base64,' in html and "compare/profile.png" in html
    assert 'class="missing"' in html and "other.png" in html  # named, not dropped
    assert "<p>Notes:</p>" in body
    assert "<ul>\n<li>first *note*</li>\n<li>second <code>note</code></li>\n</ul>" in body
