"""steer.py's index.html: per steered feature a grid, prompts down and alphas across (each cell the seeds'
images), with the run's top captions of the feature and what the scorers found it raises."""
from __future__ import annotations

from html import escape
from pathlib import Path
from urllib.parse import quote

from saeshare.disk.results import SteeredImage, SteerReport
from saeshare.render.gallery import CSS, LOAD_CHECK, chips_html, fmt

STEER_CSS = """
.feature{background:var(--card);border:1px solid var(--line);border-radius:12px;box-shadow:var(--shadow);
padding:14px;margin-bottom:22px}
.feature h2{font-size:17px;margin:0 0 6px}
table.steer{border-collapse:collapse;margin-top:10px}
table.steer th{font-weight:600;color:var(--muted);padding:4px 8px;text-align:center;font-size:13px}
table.steer th.prompt{text-align:right;max-width:220px}
table.steer td{padding:4px;vertical-align:top}
.cell{display:flex;gap:4px}.cell figure{margin:0;text-align:center;font-size:11px;color:var(--muted)}
.cell img{display:block;width:128px;height:128px;object-fit:cover;border-radius:6px;border:1px solid var(--line)}
.zero img{outline:2px solid var(--accent);outline-offset:-2px}
ol.caps{margin:6px 0 0 18px;padding:0;font-size:13px}
"""

def _cell(images: list[SteeredImage], zero: bool) -> str:
    figs = "".join(f'<figure><a href="{escape(quote(im.file))}" target="_blank"><img src="{escape(quote(im.file))}" '
                   f'alt="{escape(im.prompt)}, alpha {fmt(im.alpha)}, seed {im.seed}"></a>seed {im.seed}</figure>'
                   for im in images)
    return f'<td class="{"zero" if zero else ""}"><div class="cell">{figs}</div></td>'


def _section(report: SteerReport, i: int) -> str:
    feat = report.features[i]
    chips = [("typical activation", fmt(feat.typical)), ("norm at alpha 1", fmt(feat.norm))]
    chips += [(n.scorer, f"{n.name} (rise {fmt(n.rise)}, floor {fmt(n.floor)}"
                         f"{'' if n.rise > n.floor else ': not above chance'})") for n in feat.names]
    match = next((m for m in report.matches or [] if m.feature == feat.feature), None)
    if match is not None:
        chips.append((f"match in {report.match_target}", f"#{match.vision_feature} rho {match.rho:+.3f}: "
                      f"rise {fmt(match.rise)}, floor {fmt(match.floor)}"
                      f"{'' if match.rise > match.floor else ': not above chance'}"))
    by = {}
    for im in report.images:
        if im.direction == "feature" and (im.feature == feat.feature or im.feature is None):
            by.setdefault((im.prompt, im.alpha), []).append(im)
    head = "".join(f"<th>alpha {fmt(a)}</th>" for a in report.alphas)
    rows = "".join(f'<tr><th class="prompt">{escape(p)}</th>'
                   + "".join(_cell(by.get((p, a), []), a == 0) for a in report.alphas) + "</tr>"
                   for p in report.prompts)
    caps = "".join(f"<li>{escape(c)}</li>" for c in feat.top_captions) or "<li>none</li>"
    return (f'<section class="feature" data-feature="{feat.feature}"><h2>feature {feat.feature}</h2>'
            f'<div class="chips">{chips_html(chips)}</div><ol class="caps">{caps}</ol>'
            f'<table class="steer"><tr><th></th>{head}</tr>{rows}</table></section>')


def write_page(path: Path, report: SteerReport) -> None:
    meta = [("pipeline", report.pipeline), ("run", f"{report.run} layer {report.layer}"),
            ("positions", report.positions), ("branches", "both" if report.both_branches else "conditional"),
            ("steps", str(report.steps)), ("guidance", fmt(report.guidance))]
    meta_html = "".join(f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in meta)
    body = "".join(_section(report, i) for i in range(len(report.features)))
    title = f"Steering {report.run} · layer {report.layer}"
    path.write_text(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{CSS}{STEER_CSS}</style></head><body><header><div class=\"wrap\"><h1>{escape(title)}</h1>"
        f'<dl class="meta">{meta_html}</dl></div></header><main class="wrap">{body}</main>'
        "<footer>saeshare steer.py: alpha is in units of the feature's typical activation on the run's samples; "
        "alpha 0 (outlined) is the pipeline unsteered.</footer>"
        f"<script>{LOAD_CHECK}</script></body></html>", encoding="utf-8")
