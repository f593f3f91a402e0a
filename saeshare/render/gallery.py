"""The static HTML gallery of show.py (docs/design.md#previews): one self-contained page that opens from disk (file://),
with no server, network, external CSS, JS or fonts. Cards (one per feature) or groups of cards (one
per source feature of a Comparative Sharedness output) can be filtered by caption text or feature id
(the filter is kept in the address, index.html#q=red%20circle, to share a view) and re-sorted. On
load the page records how many of its images decoded, for the browser test."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

LAZY_ABOVE = 200
"""Pages with more cards than this load grids lazily (as they scroll into view)."""
CAPTIONS_OPEN = 3
"""Top captions shown on a card; the others are folded."""


class Card(NamedTuple):
    """One feature of one run."""
    title: str
    feature: int
    image: str
    """Path of the grid image, relative to the page."""
    image_size: tuple[int, int]
    mass: float
    n_active: int
    n_samples: int
    top: list[tuple[int, float, str]]
    """(sample, activation, caption) of its top samples, best first (active samples only)."""
    chips: tuple[tuple[str, str], ...] = ()
    """Extra (label, value) chips, e.g. ("rho", "+0.83")."""
    tone: str = ""
    """"source", "G" or "H" in a comparison: colours the card."""


class Group(NamedTuple):
    """A source feature and its best matches in other runs (a comp_sharedness feature)."""
    title: str
    feature: int
    chips: list[tuple[str, str]]
    sort: dict[str, float]
    """Sort keys (see write_index's sort_options) -> value."""
    cards: list[Card]


def fmt(x: float) -> str:
    """Compact number for labels: 4 significant digits, no exponent."""
    return f"{x:,.4g}" if abs(x) < 1e4 else f"{x:,.0f}"


def chips_html(chips: list[tuple[str, str]]) -> str:
    return "".join(f'<span class="chip"><b>{escape(k)}</b> {escape(v)}</span>' for k, v in chips)


def _caption_items(top: list[tuple[int, float, str]]) -> str:
    return "".join(f'<li><span class="act">{escape(fmt(a))}</span><span class="sid">#{n}</span> {escape(c)}</li>'
                   for n, a, c in top)


def _card(card: Card, lazy: bool, item: bool) -> str:
    share = f"{100 * card.n_active / card.n_samples:.1f}%" if card.n_samples else "-"
    chips = [("mass", fmt(card.mass)), ("active", f"{card.n_active}/{card.n_samples} ({share})"),
             *((("max", fmt(card.top[0][1])),) if card.top else ()), *card.chips]
    src = escape(quote(card.image))
    w, h = card.image_size
    head, rest = card.top[:CAPTIONS_OPEN], card.top[CAPTIONS_OPEN:]
    folded = (f'<details><summary>{len(rest)} more</summary><ol start="{CAPTIONS_OPEN + 1}">{_caption_items(rest)}'
              f"</ol></details>") if rest else ""
    loading = ' loading="lazy"' if lazy else ""
    attrs = (f' class="card item{" " + card.tone if card.tone else ""}" data-feature="{card.feature}" '
             f'data-mass="{card.mass!r}" data-active="{card.n_active}"') if item else \
        f' class="card{" " + card.tone if card.tone else ""}"'
    return (f"<article{attrs}><div class=\"head\"><h2>{escape(card.title)}</h2>"
            f'<div class="chips">{chips_html(chips)}</div></div>'
            f'<a class="grid" href="{src}" target="_blank" title="open the grid full size">'
            f'<img src="{src}" width="{w}" height="{h}" alt="top samples of {escape(card.title)}"'
            f'{loading}></a>'
            f'<ol class="caps">{_caption_items(head) or "<li class=none>no active sample</li>"}</ol>{folded}</article>')


def _group(group: Group, lazy: bool) -> str:
    sort = "".join(f' data-{k}="{v!r}"' for k, v in group.sort.items())
    return (f'<section class="group item" data-feature="{group.feature}"{sort}>'
            f'<div class="ghead"><h2>{escape(group.title)}</h2><div class="chips">{chips_html(group.chips)}</div></div>'
            f'<div class="cards">{"".join(_card(c, lazy, item=False) for c in group.cards)}</div></section>')


def write_index(path: Path, title: str, meta: list[tuple[str, str]], items: list[Card] | list[Group],
                sort_options: list[tuple[str, str]], what: str = "features") -> None:
    """Write the page. meta: (label, value) shown in the header; sort_options: (data key, label), first =
    the order of `items`; what: the noun the counter uses."""
    n_cards = sum(len(i.cards) if isinstance(i, Group) else 1 for i in items)
    lazy = n_cards > LAZY_ABOVE
    body = "".join(_group(i, lazy) if isinstance(i, Group) else _card(i, lazy, item=True) for i in items)
    grouped = bool(items) and isinstance(items[0], Group)
    options = "".join(f'<option value="{escape(k)}">{escape(label)}</option>' for k, label in sort_options)
    meta_html = "".join(f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in meta)
    path.write_text(PAGE.format(
        title=escape(title), meta=meta_html, options=options, body=body, css=CSS, what=json.dumps(what),
        layout="groups" if grouped else "cards", js=JS), encoding="utf-8")


CSS = """
:root{--bg:#f4f5f7;--card:#fff;--ink:#1d2330;--muted:#667085;--line:#e4e7ec;--chip:#eef1f6;--accent:#3056d3;
--g:#0f8a5f;--h:#c2410c;--shadow:0 1px 2px rgba(16,24,40,.06),0 1px 3px rgba(16,24,40,.10)}
@media (prefers-color-scheme:dark){:root{--bg:#12151b;--card:#1b2029;--ink:#e6e9ef;--muted:#98a2b3;--line:#2b3240;
--chip:#252c38;--accent:#8ea8ff;--g:#4ade80;--h:#fb923c;--shadow:none}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
.wrap{max-width:1600px;margin:0 auto;padding:0 20px}
header{background:var(--card)}
header .wrap{padding-top:16px;padding-bottom:4px}
.bar{background:var(--card);border-bottom:1px solid var(--line);position:sticky;top:0;z-index:2;padding:10px 0}
h1{font-size:20px;margin:0 0 8px;font-weight:650;letter-spacing:-.01em}
h1 small{color:var(--muted);font-weight:500;font-size:14px;margin-left:8px}
dl.meta{display:flex;flex-wrap:wrap;gap:4px 18px;margin:0 0 6px;font-size:13px}
dl.meta div{display:flex;gap:6px}dl.meta dt{color:var(--muted)}dl.meta dd{margin:0;font-weight:550;
overflow-wrap:anywhere}
.tools{display:flex;flex-wrap:wrap;gap:10px;align-items:center}
.tools input{flex:1 1 320px;max-width:560px;padding:8px 12px;border:1px solid var(--line);border-radius:8px;
background:var(--bg);color:var(--ink);font:inherit}
.tools input:focus{outline:2px solid var(--accent);outline-offset:-1px}
.tools select{padding:7px 8px;border:1px solid var(--line);border-radius:8px;background:var(--bg);color:var(--ink);
font:inherit}
.tools label{color:var(--muted);display:flex;gap:6px;align-items:center}
#count{color:var(--muted);margin-left:auto;font-variant-numeric:tabular-nums}
main{padding-top:18px;padding-bottom:40px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:16px}
.groups{display:flex;flex-direction:column;gap:22px}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;box-shadow:var(--shadow);padding:12px;
display:flex;flex-direction:column;gap:10px;min-width:0}
.card.source{border-top:4px solid var(--accent)}.card.G{border-top:4px solid var(--g)}
.card.H{border-top:4px solid var(--h)}
.head{display:flex;flex-direction:column;gap:6px}
.card h2{font-size:16px;margin:0;font-weight:650}
.chips{display:flex;flex-wrap:wrap;gap:5px}
.chip{background:var(--chip);border-radius:999px;padding:2px 9px;font-size:12px;font-variant-numeric:tabular-nums;
white-space:nowrap}
.chip b{color:var(--muted);font-weight:500}
a.grid{display:block;border-radius:8px;overflow:hidden;line-height:0;background:var(--chip)}
a.grid img{width:100%;height:auto}
ol.caps,details ol{margin:0;padding-left:0;list-style:none;font-size:13px}
ol.caps li,details li{padding:3px 0;border-top:1px solid var(--line);overflow-wrap:anywhere}
ol.caps li:first-child{border-top:0}
.act{display:inline-block;min-width:50px;margin-right:6px;font-variant-numeric:tabular-nums;font-weight:600;
color:var(--accent)}
.sid{color:var(--muted);font-size:11px;margin-right:4px}
li.none{color:var(--muted)}
details summary{cursor:pointer;color:var(--muted);font-size:12px}
.group{background:var(--card);border:1px solid var(--line);border-radius:14px;padding:14px;box-shadow:var(--shadow)}
.group .card{box-shadow:none;background:var(--bg)}
.ghead{display:flex;flex-wrap:wrap;gap:8px 14px;align-items:baseline;margin-bottom:12px}
.ghead h2{font-size:17px;margin:0}
#none{color:var(--muted);text-align:center;padding:40px}
footer{color:var(--muted);font-size:12px;text-align:center;padding:0 0 24px}
"""

LOAD_CHECK = """
window.addEventListener('load', () => {  // a self-check, read by the browser tests
  const imgs = [...document.images];
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(im => im.complete && im.naturalWidth > 0).length;
});
"""
"""How many of the page's images decoded, as attributes of <body>."""

JS = LOAD_CHECK + """
const box = document.getElementById('cards'), items = [...box.children], q = document.getElementById('q');
const sel = document.getElementById('sort'), count = document.getElementById('count');
const text = items.map(el => el.textContent.toLowerCase());
function update() {
  const s = q.value.trim().toLowerCase(), id = s.match(/^#(\\d+)$/);
  const words = /^".*"$/.test(s) ? [s.slice(1, -1)] : s.split(/\\s+/);  // "red cross": a phrase
  let shown = 0;
  items.forEach((el, i) => {
    const ok = id ? el.dataset.feature === id[1] : words.every(w => text[i].includes(w));
    el.hidden = !ok; shown += ok;
  });
  count.textContent = `${shown} of ${items.length} ${WHAT}`;
  document.getElementById('none').hidden = shown > 0;
}
function sortBy() {
  const k = sel.value, order = items.map((el, i) => [el, i]);
  if (k !== sel.options[0].value) order.sort((a, b) => k === 'feature'
    ? a[0].dataset.feature - b[0].dataset.feature : b[0].dataset[k] - a[0].dataset[k] || a[1] - b[1]);
  order.forEach(([el]) => box.appendChild(el));
}
q.addEventListener('input', () => {
  update(); history.replaceState(null, '', q.value ? '#q=' + encodeURIComponent(q.value) : '#');
});
sel.addEventListener('change', sortBy);
document.addEventListener('keydown', e => {
  if (e.key === '/' && document.activeElement !== q) { e.preventDefault(); q.focus(); }
});
if (location.hash.startsWith('#q=')) q.value = decodeURIComponent(location.hash.slice(3));  // a shareable filter
update();
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body><header><div class="wrap"><h1>{title}</h1><dl class="meta">{meta}</dl></div></header>
<div class="bar"><div class="wrap tools"><input id="q" type="search" autocomplete="off"
placeholder='Filter: words of the captions, "a phrase", or #12 for feature 12   (press /)'>
<label>sort <select id="sort">{options}</select></label><span id="count"></span></div></div>
<main class="wrap"><div id="cards" class="{layout}">{body}</div>
<p id="none" hidden>No card matches the filter.</p></main>
<footer>saeshare show.py: each grid shows the 9 samples that activate the feature most, best first
(#sample, activation); grey tiles are samples on which the feature is 0.</footer>
<script>const WHAT = {what};{js}</script></body></html>
"""
