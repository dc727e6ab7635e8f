"""The report's HTML building blocks: its style sheet, escaping, embedded PNG figures and tables."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2125;
background:#fafafa;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff;box-shadow:0 0 6px rgba(0,0,0,.06)}
h1{font-size:1.6em;margin:.2em 0 .1em}h2{font-size:1.3em;border-bottom:2px solid #e3e6ea;padding-bottom:4px;
margin-top:2em}h3{font-size:1.08em;margin:1.4em 0 .4em}
.meta{color:#5b6570;font-size:.92em}
table{border-collapse:collapse;font-size:.84em;margin:.4em 0 1em}
th,td{border:1px solid #dfe3e8;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f1f3f5;position:sticky;top:0}td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fbfbfc}td.wrap{white-space:normal;min-width:320px}
td.best{font-weight:700;background:#e6f4ea!important}
table.results td,table.results th{padding:3px 5px}td.grp{border-left:2px solid #c9ced4}
.scroll{overflow-x:auto;max-width:100%}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid #e3e6ea;padding:6px;background:#fff}
figcaption{font-size:.8em;color:#5b6570;text-align:center}
img{display:block;max-width:100%;height:auto}
pre{background:#f6f8fa;border:1px solid #e3e6ea;padding:10px;overflow-x:auto;font-size:.78em;max-height:420px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;font-size:.9em}
.fail td{color:#8a1c1c}
nav a{margin-right:14px;font-size:.9em}
details{margin:.5em 0}summary{cursor:pointer;color:#0b5cad}
.sw{display:inline-block;width:.8em;height:.8em;margin-right:.4em;vertical-align:-.05em;border:1px solid #555}
"""


def escape(value: Any) -> str:
    """``value`` as HTML text (``None`` as empty)."""
    return html.escape("" if value is None else str(value))


def figure(png: bytes, caption: str, width: int | None = None) -> str:
    """A captioned ``<figure>`` with the PNG embedded as a ``data:`` URI (``width`` in pixels)."""
    data = base64.b64encode(png).decode("ascii")
    style = f' style="width:{width}px"' if width else ""
    return (f'<figure{style}><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def styled_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int = 1,
                 best: Mapping[tuple[int, int], bool] | None = None, row_class: str = "",
                 wrap_last: bool = False) -> str:
    """A table: the first ``left`` columns left-aligned, cells ``best[(row, column)]`` in bold,
    every row of class ``row_class``, the last column wrapping when ``wrap_last``."""
    out = ['<div class="scroll"><table><thead><tr>']
    out += [f'<th class="{"l" if i < left else ""}">{escape(h)}</th>' for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(rows):
        out.append(f'<tr class="{row_class}">')
        for c, cell in enumerate(row):
            cls = " ".join(x for x in ("l" if c < left else "", "best" if best and best.get((r, c)) else "",
                                       "wrap" if wrap_last and c == len(row) - 1 else "") if x)
            out.append(f'<td class="{cls}">{escape(cell)}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain table in the report's style, cells escaped (for ``render_report(sections=...)``)."""
    return styled_table(header, rows)
