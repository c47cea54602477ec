"""The report as data — sections of paragraphs, tables, figures and HTML pieces — and its two renderings: REPORT.md
and one self-contained report.html (no external resources: figures inline as SVG, thumbnails as data: URIs)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from distill.io import atomic_path
from distill.report.plots import Figure

LABELS = {
    "teacher_base": "teacher before adaptation",
    "teacher": "teacher",
    "student_init": "student before training",
    "baseline": "student, hard labels only",
    "student": "student, distilled",
    "student_int8": "student, distilled, int8",
    "student_qad": "student, trained through its GGUF rounding (QAD)",
    "student_rtn": "student, rounded to that GGUF type after training",
}


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cell(value, fmt) -> str:
    """A table cell: — for a figure that was not measured, bytes made readable when ``fmt`` is None."""
    return "—" if value is None else human_bytes(value) if fmt is None else fmt.format(value)


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str | None = None  # "l" or "r" per column; default: the first names the row (left), figures right

    def left(self, column: int) -> bool:
        return (self.align or "l" + "r" * (len(self.header) - 1))[column] == "l"


@dataclass(frozen=True)
class Link:
    """A table cell that links (a run folder's file); Markdown shows its text."""

    text: str
    href: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Html:
    """A piece only a page can show (thumbnails, coloured tokens, the headline card), with its Markdown stand-in."""

    html: str
    markdown: str


@dataclass
class Section:
    heading: str
    blocks: list = field(default_factory=list)  # str (a paragraph) | Table | Figure | Html


def md_text(text) -> str:
    """Text as Markdown shows it, never as raw HTML: what comes from the data (class names, snippets, run names) may
    hold <, > or &, as report.html's html.escape knows. Our own text uses none of them as markup."""
    return html.escape(str(text), quote=False)


def markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {md_text(title)}"]
    for section in sections:
        if section.heading:
            parts.append(f"## {md_text(section.heading)}")
        for block in section.blocks:
            if isinstance(block, str):
                parts.append(md_text(block))
            elif isinstance(block, Table):
                parts.append(markdown_table(block))
            elif isinstance(block, Figure):
                parts.append(f"![{md_text(block.title)}]({block.png.name})")
            else:
                parts.append(md_text(block.markdown))
    return "\n\n".join(p for p in parts if p) + "\n"


def markdown_table(table: Table) -> str:
    def escape(text: str) -> str:  # a | in a cell would end it
        return md_text(text).replace("|", "\\|").replace("\n", " ⏎ ").strip()

    lines = ["| " + " | ".join(map(escape, table.header)) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in table.rows]
    return "\n".join(lines)


def inline(text: str) -> str:
    """A paragraph's Markdown emphasis and code as HTML (the only Markdown our paragraphs use), escaped first."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _cell_html(value) -> str:
    if isinstance(value, Link):
        return f'<a href="{html.escape(value.href)}">{html.escape(value.text)}</a>'
    return html.escape(str(value))


def html_table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(h))}</th>" for h in table.header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=left' if table.left(i) else ''}>{_cell_html(value)}</td>" for i, value in enumerate(row)
        )
        + "</tr>"
        for row in table.rows
    )
    return f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def html_page(title: str, sections: list[Section]) -> str:
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for section in sections:
        if section.heading:
            body.append(f"<h2>{esc(section.heading)}</h2>")
        for block in section.blocks:
            if isinstance(block, str):
                body.append(f"<p>{inline(block)}</p>")
            elif isinstance(block, Table):
                body.append(html_table(block))
            elif isinstance(block, Figure):
                body.append(f'<figure role=img aria-label="{esc(block.title)}">{block.svg}</figure>')
            else:
                body.append(block.html)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>" + "".join(body) + "</body></html>\n"
    )


def write_pages(markdown_path: Path, html_path: Path, title: str, sections: list[Section]) -> Path:
    """Both renderings of one document, each written atomically; returns the Markdown file."""
    with atomic_path(markdown_path) as tmp:
        tmp.write_text(markdown(title, sections))
    with atomic_path(html_path) as tmp:
        tmp.write_text(html_page(title, sections))
    return markdown_path


CSS = (
    "body{font-family:system-ui,'DejaVu Sans',sans-serif;max-width:1100px;margin:1.5em auto;padding:0 12px;"
    "color:#222;line-height:1.45}h1{font-size:1.5em;overflow-wrap:anywhere}h2{margin-top:1.6em;"
    "border-bottom:1px solid #ddd}p{overflow-wrap:anywhere}"
    ".scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}td.left{text-align:left}"
    "th{background:#f4f4f4}code{background:#f4f4f4;padding:0 3px;overflow-wrap:anywhere}"
    "figure{margin:.5em 0}figure svg{max-width:100%;height:auto;display:block}"
    ".warning{background:#fdecea;border-left:5px solid #c44e52;padding:8px 12px;margin:.6em 0}"
    ".card{display:flex;flex-wrap:wrap;gap:10px;margin:1em 0}.tile{flex:1 1 150px;border:1px solid #ddd;"
    "border-radius:8px;padding:10px 12px;background:#fafafa}.tile b{display:block;font-size:1.6em;color:#2a5d9f}"
    ".tile span{font-size:.85em;color:#555}.note{color:#555;font-size:.9em}"
    ".examples{display:flex;flex-wrap:wrap;gap:10px}.example{flex:1 1 230px;border:1px solid #ddd;"
    "border-radius:6px;padding:8px;font-size:.85em;max-width:100%;box-sizing:border-box;overflow-wrap:anywhere}"
    ".example img{image-rendering:pixelated;width:84px;height:84px;display:block}"
    ".passage{white-space:pre-wrap;font-family:'DejaVu Sans Mono',monospace;font-size:.85em;line-height:1.7;"
    "border:1px solid #ddd;padding:8px;overflow-wrap:anywhere}"
)
