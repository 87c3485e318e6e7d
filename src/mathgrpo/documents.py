"""Markdown and HTML rendering: the metric tables (the evaluation's printed table and the report's) and a document
as a list of blocks (`("h1" | "h2" | "p", text)`, `("table", (headers, cells))`, `("img", (png path, caption))`)
written once as report.md (images linked) and once as report.html (images embedded, one self-contained file).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path


# --- tables ---------------------------------------------------------------------------------------------

def _fmt(x, key: str = "", signed: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    digits = 1 if key == "completion_length" else 3
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(headers, formatted cells) of `compare` rows, or of `single_rows` rows; the report renders these too."""
    if rows and "value" in rows[0]:
        return ["metric", "value"], [[r["metric"], _fmt(r["value"], r["key"])] for r in rows]
    cells = []
    for r in rows:
        ci = "-" if r.get("ci_low") is None else \
            f"[{_fmt(r['ci_low'], r['key'], True)}, {_fmt(r['ci_high'], r['key'], True)}]"
        cells.append([r["metric"], _fmt(r["base"], r["key"]), _fmt(r["trained"], r["key"]),
                      _fmt(r["diff"], r["key"], True), ci])
    return ["metric", "base", "trained", "diff", "95% CI"], cells


def markdown_table(headers: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells])



# --- documents: a list of blocks rendered to markdown and to HTML -------------------------------------------

def _md_img(path: Path, caption: str, root: Path) -> str:
    return f"![{caption}]({path.relative_to(root).as_posix()})\n\n*{caption}*"


def _html_img(path: Path, caption: str, root: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _html_table(headers, cells) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


RENDER_MD = {
    "h1": lambda t, root: f"# {t}",
    "h2": lambda t, root: f"## {t}",
    "p": lambda t, root: t,
    "table": lambda t, root: markdown_table(*t),
    "img": lambda t, root: _md_img(*t, root),
}
RENDER_HTML = {
    "h1": lambda t, root: f"<h1>{html.escape(t)}</h1>",
    "h2": lambda t, root: f"<h2>{html.escape(t)}</h2>",
    "p": lambda t, root: f"<p>{html.escape(t)}</p>",
    "table": lambda t, root: _html_table(*t),
    "img": lambda t, root: _html_img(*t, root),
}
CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
       "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555;font-size:90%}"
       "pre{background:#f5f5f5;padding:8px}")


def write_documents(blocks: list[tuple[str, object]], out_dir: Path, title: str) -> tuple[Path, Path]:
    md = "\n\n".join(RENDER_MD[kind](payload, out_dir) for kind, payload in blocks) + "\n"
    body = "\n".join(RENDER_HTML[kind](payload, out_dir) for kind, payload in blocks)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(md)
    html_path.write_text(page)
    return md_path, html_path
