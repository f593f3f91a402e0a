"""A report as a list of typed sections, rendered once to Markdown and once to a static HTML page
(no network: every image is a relative path beside the page). The demo's and a study's reports are
two such lists."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from saeshare.disk.files import write_atomic


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str
    emphasis: bool = False
    """Bold in Markdown, a highlighted box in HTML (the headline)."""


@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]


@dataclass
class Bullets:
    items: list[str]
    lead: str = ""
    """A line before the list (Markdown) or a heading over it (HTML)."""
    failed: list[bool] = field(default_factory=list)
    """Items to mark in bold in HTML (a failed check)."""


@dataclass
class Images:
    """Figures side by side: (relative path, alt text)."""
    images: list[tuple[str, str]]
    wide: bool = False
    """One figure as wide as the page."""


@dataclass
class Grids:
    """Feature grids with a caption each: (relative path, alt text, caption)."""
    cards: list[tuple[str, str, str]]


@dataclass
class Link:
    href: str
    text: str
    """The link's text in HTML; Markdown writes `Previews: [href](href)`."""


Section = Heading | Text | Table | Bullets | Images | Grids | Link

STYLE = """<style>
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2330}
h1{margin-bottom:.2em} .headline{background:#eef4ff;border-left:4px solid #3b6fd8;padding:.7em 1em;font-weight:600}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:14px}
th,td{border-bottom:1px solid #dde2ea;padding:.3em .7em;text-align:right}
th{background:#f5f7fa} td:first-child,th:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} .plots img{max-width:min(100%,520px);margin:.4em 0}
.grids{display:flex;flex-wrap:wrap;gap:12px}
code{background:#f1f3f7;padding:0 .25em;border-radius:3px;font-size:92%}
figure{margin:0;width:200px} figure img{width:200px;border-radius:4px} figcaption{font-size:13px;color:#555}
</style>"""


def _md(s: Section) -> str:
    if isinstance(s, Heading):
        return f"\n{'#' * s.level} {s.text}\n"
    if isinstance(s, Text):
        return f"**{s.text}**\n" if s.emphasis else f"{s.text}\n"
    if isinstance(s, Table):
        return "\n".join(["| " + " | ".join(s.head) + " |", "|" + "---|" * len(s.head),
                          *("| " + " | ".join(r) + " |" for r in s.rows)]) + "\n"
    if isinstance(s, Bullets):
        return (f"{s.lead}\n" if s.lead else "") + "".join(f"- {item}\n" for item in s.items)
    if isinstance(s, Images):
        return "".join(f"![{alt}]({path})\n" for path, alt in s.images)
    if isinstance(s, Grids):
        return "".join(f"![{alt}]({path})\n" for path, alt, _ in s.cards)
    return f"Previews: [{s.href}]({s.href})\n"


def markdown(title: str, sections: list[Section]) -> str:
    return f"# {title}\n" + "\n".join(_md(s) for s in sections)


def _inline(text: str) -> str:
    """Escaped text whose `code` spans (the Markdown's backticks) become <code>."""
    parts = html.escape(text).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick is a character, not markup
        return html.escape(text)
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html(s: Section) -> str:
    e = _inline
    if isinstance(s, Heading):
        return f"<h{s.level}>{e(s.text)}</h{s.level}>"
    if isinstance(s, Text):
        return f'<p class="headline">{e(s.text)}</p>' if s.emphasis else f"<p>{e(s.text)}</p>"
    if isinstance(s, Table):
        head = "".join(f"<th>{e(h)}</th>" for h in s.head)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in s.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(s, Bullets):
        failed = s.failed or [False] * len(s.items)
        items = "".join(f"<li>{'<b>' if bad else ''}{e(item)}{'</b>' if bad else ''}</li>"
                        for item, bad in zip(s.items, failed))
        return (f"<h3>{e(s.lead.rstrip(':'))}</h3>" if s.lead else "") + f"<ul>{items}</ul>"
    if isinstance(s, Images):
        style = ' style="max-width:100%"' if s.wide else ""
        imgs = "".join(f'<img src="{html.escape(path)}" alt="{html.escape(alt)}"{style}>' for path, alt in s.images)
        return f'<div class="plots">{imgs}</div>'
    a = html.escape  # attributes: plain text
    if isinstance(s, Grids):
        return ('<div class="grids">' + "".join(f'<figure><img src="{a(path)}" alt="{a(alt)}"><figcaption>{e(caption)}'
                                                 "</figcaption></figure>" for path, alt, caption in s.cards) + "</div>")
    return f'<p><a href="{a(s.href)}">{e(s.text)}</a></p>'


def page(title: str, sections: list[Section]) -> str:
    body = "\n".join(_html(s) for s in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"{STYLE}</head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>")


def write_report(out: Path, title: str, sections: list[Section]) -> None:
    """<out>/report.md and <out>/report.html, each written atomically."""
    md = markdown(title, sections)
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(md))
    html_page = page(title, sections)
    write_atomic(out / "report.html", lambda tmp: tmp.write_text(html_page))
