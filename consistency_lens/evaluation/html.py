"""Small helpers for the self-contained HTML pages (no external CSS, fonts or scripts)."""

from __future__ import annotations

from html import escape
from typing import Any

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #1d2330; background: #fff; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #dde; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d5d9e2; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #eef1f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #6b7385; } .small { font-size: 0.85em; }
.ctx { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap;
       font-size: 0.85em; max-width: 46em; }
.p-token { background: #ffd54a; border-radius: 3px; outline: 1px solid #c9a000; }
.expl { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 1em; }
.plot { border: 1px solid #e3e6ee; border-radius: 6px; padding: 0.3em; }
.tok { position: relative; cursor: help; border-bottom: 2px solid #9db4e8; margin: 0 1px;
       white-space: pre; font-family: ui-monospace, Menlo, Consolas, monospace; }
.tok:hover { background: #e3ecff; }
.tok .tip { display: none; position: absolute; left: 0; top: 1.6em; z-index: 10; width: max-content;
            max-width: 28em; white-space: pre-wrap; background: #1d2330; color: #fff;
            padding: 0.4em 0.6em; border-radius: 4px; font-size: 0.85em; }
.tok:hover .tip { display: block; }
.text-flow { line-height: 2.4; font-size: 1.05em; }
"""


def page(title: str, body: str, head_extra: str = "") -> str:
    """A complete HTML document with the shared stylesheet inline."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{CSS}</style>{head_extra}</head>"
        f"<body><h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def fmt(value: Any, digits: int = 4) -> str:
    """A number as text with a sensible precision; other values as `str`."""
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 1000 or (value != 0 and abs(value) < 10 ** (-digits)):
            return f"{value:.3e}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]], css_class: str = "") -> str:
    """An HTML table; numeric cells are right-aligned, every cell is escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float))
            cls = " class='num'" if numeric else ""
            cells.append(f"<td{cls}>{escape(fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = f" class='{css_class}'" if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
