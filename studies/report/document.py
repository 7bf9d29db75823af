"""The document model: a report as a list of blocks, rendered to self-contained HTML and to Markdown.

HTML embeds every figure as a base64 data URI (no external CSS/JS; opens without network); Markdown links the
figures by their path relative to the results folder.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from studies.report.style import fmt, slug

__all__ = ["Doc", "render_html", "render_md", "md_table", "html_table"]


@dataclass
class Doc:
    """A report as a list of blocks: headings, paragraphs, notes, lists, tables, figures, code, details."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    def ul(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def fig(self, path: Path, caption: str) -> None:
        self.blocks.append(("fig", path, caption))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def details(self, summary: str, text: str) -> None:
        self.blocks.append(("details", summary, text))


def _cell_text(v: Any) -> str:
    return v if isinstance(v, str) else fmt(v) if isinstance(v, (float, np.floating)) else str(v)


def md_table(df: pd.DataFrame) -> str:
    """`df` as a Markdown table (floats through :func:`studies.report.style.fmt`)."""
    def cell(v: Any) -> str:
        return _cell_text(v).replace("|", "\\|").replace("\n", " ")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cell(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def html_table(df: pd.DataFrame) -> str:
    """`df` as an HTML table (escaped; floats through :func:`studies.report.style.fmt`)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = ["<tr>" + "".join(f"<td>{html.escape(_cell_text(v))}</td>" for v in row) + "</tr>"
            for row in df.itertuples(index=False)]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;font-size:0.85em;margin:0.8em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;white-space:nowrap}th{background:#f0f0f0}
tr:nth-child(even){background:#fafafa}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:0.9em;color:#555}
.note{color:#666;font-style:italic}pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.85em}
"""


def render_html(doc: Doc, title: str) -> str:
    """The self-contained HTML page of `doc`."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            lvl = min(6, b[1] + 1)
            parts.append(f"<h{lvl} id='{slug(b[2])}'>{html.escape(b[2])}</h{lvl}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(b[1])}</p>")
        elif kind == "note":
            parts.append(f"<p class='note'>{html.escape(b[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            parts.append(html_table(b[1]))
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "details":
            parts.append(f"<details><summary>{html.escape(b[1])}</summary><pre>{html.escape(b[2])}</pre></details>")
        elif kind == "fig":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_md(doc: Doc, title: str, out_dir: Path) -> str:
    """The Markdown text of `doc`; figures are linked relative to `out_dir`."""
    parts = [f"# {title}", ""]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            parts += [f"{'#' * min(6, b[1] + 1)} {b[2]}", ""]
        elif kind == "p":
            parts += [b[1], ""]
        elif kind == "note":
            parts += [f"_{b[1]}_", ""]
        elif kind == "ul":
            parts += [f"- {x}" for x in b[1]] + [""]
        elif kind == "table":
            parts += [md_table(b[1]), ""]
        elif kind == "pre":
            parts += ["```", b[1], "```", ""]
        elif kind == "details":
            parts += [f"<details><summary>{html.escape(b[1])}</summary>", "", "```json", b[2], "```", "",
                      "</details>", ""]
        elif kind == "fig":
            rel = Path(b[1]).relative_to(out_dir).as_posix()
            parts += [f"![{b[2]}]({rel})", "", f"*{b[2]}*", ""]
    return "\n".join(parts)
