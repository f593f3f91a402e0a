"""The demo's report: report.md and a static report.html (no network) from demo.py's results."""
from __future__ import annotations

import html
from pathlib import Path

from records import write_atomic
from results import DemoResults
from runs import RunMeta

IMAGE, TEXT, NULL = "effnet", "minilm", "null"
"""The demo's runs: the image model, the text model, the null text run."""


def _quality_rows(meta: RunMeta) -> list[list[str]]:
    return [[str(layer), str(i.d_model), str(i.n_features), f"{i.fvu:.3f}", f"{i.fvu_pooled:.3f}",
             f"{i.l0:.1f}", f"{i.dead_fraction:.3f}", f"{i.tokens_seen:,}"]
            for layer, i in ((layer, meta.layer_info[layer]) for layer in meta.layers)]


QUALITY_HEAD = ["layer", "d", "features", "FVU (training)", "FVU (pooled)", "L0", "dead", "tokens"]


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _sections(res: DemoResults) -> dict:
    """The report's content once, rendered to Markdown and HTML below."""
    names = list(res.runs)
    w = res.wmppc
    run_rows = [[n, m.model, html.escape(Path(m.checkpoint).name), m.modality, m.token,
                 str(len(m.layers)), str(m.dataset.n_samples),
                 "captions shuffled (null)" if m.dataset.shuffle_captions is not None else "",
                 f"{res.train_seconds[n]:.0f}"] for n, m in res.runs.items()]
    wm_rows = [[a] + [f"{w[f'{a}->{b}'].all_layers:.3f} / {w[f'{a}->{b}'].last_layer:.3f}" if a != b else "–"
                      for b in names] for a in names]
    feat_rows = [[str(f.feature), f"{f.delta:.4g}", f"{f.mass:.4g}",
                  f"{f.rho[TEXT]:+.3f} (#{f.match[TEXT]})", f"{f.rho[NULL]:+.3f} (#{f.match[NULL]})",
                  f"{html.escape(at.attribute)} (r={at.r:.2f})", f"{html.escape(at.match_attribute)} (r={at.match_r:.2f})"]
                 for f, at in zip(res.sharedness.features, res.attributes)]
    return {"run_rows": run_rows, "wm_rows": wm_rows, "feat_rows": feat_rows, "names": names}


RUN_HEAD = ["run", "model", "checkpoint", "modality", "token", "layers", "samples", "note", "train s"]
FEAT_HEAD = ["feature", "Delta", "mass S", f"rho -> {TEXT} (match)", f"rho -> {NULL} (match)",
             f"best attribute of {IMAGE} feature", f"best attribute of matched {TEXT} feature"]


def headline(res: DemoResults) -> str:
    text, null = res.wmppc[f"{IMAGE}->{TEXT}"], res.wmppc[f"{IMAGE}->{NULL}"]
    return (f"wMPPC {IMAGE} -> {TEXT}: all layers {text.all_layers:.3f}, last layer {text.last_layer:.3f}; "
            f"{IMAGE} -> {NULL} (null): all layers {null.all_layers:.3f}, last layer {null.last_layer:.3f}")


INTRO = (f"Two real pretrained encoders that ship in PyPI packages, EfficientNet-Lite0 (`{IMAGE}`, images) and "
         f"all-MiniLM-L6-v2 (`{TEXT}`, the captions of the same images), and a null run (`{NULL}`: the same text "
         "model over captions shuffled across samples, so anything it shares with the images is chance). A top-k "
         "SAE is trained on every layer of each, on the built-in `shapes` dataset.")
READING = ("wMPPC A -> B is the activation-mass-weighted mean, over A's features, of the best Pearson correlation "
           "with any feature of B: 1 means every concept of A is found in B. Comparative Sharedness ranks "
           f"the features of `{IMAGE}` shared with `{TEXT}` but not with `{NULL}`: "
           "Delta = S * (rho_text^2 - rho_null^2).")


def settings(res: DemoResults) -> str:
    sae = next(iter(res.runs.values())).sae
    batches = ", ".join(f"{n}: {m.sae.batch_size}" for n, m in res.runs.items())
    return (f"SAE settings: top_k {sae.top_k}, expansion factor {sae.expansion_factor}, lr {sae.lr:g}, "
            f"one epoch; batch ({batches}). The paper's lr 5e-5 is tuned for COCO's thousands of steps; "
            "`uv run demo.py --paper_defaults` uses it.")


def write(res: DemoResults, out: Path) -> None:
    s = _sections(res)
    runs = res.runs
    md = [f"# saeshare demo report\n\n{INTRO} {settings(res)}\n\n**{headline(res)}**\n\n{READING}\n",
          "## Runs\n", _md_table(RUN_HEAD, s["run_rows"]),
          "\n## wMPPC (row -> column; all layers / last layer)\n", _md_table(["source"] + s["names"], s["wm_rows"]),
          f"\n![wMPPC between runs](wmppc_runs.png)\n![{IMAGE} -> {TEXT} per layer pair](wmppc_{IMAGE}_{TEXT}.png)"
          f"\n![{IMAGE} -> {NULL} per layer pair](wmppc_{IMAGE}_{NULL}.png)\n",
          f"\n## Top shared features of `{IMAGE}` (last layer)\n", _md_table(FEAT_HEAD, s["feat_rows"]),
          f"\nPreviews: [{res.gallery}]({res.gallery})\n"]
    for name, meta in runs.items():
        md += [f"\n## SAE quality: `{name}`\n", _md_table(QUALITY_HEAD, _quality_rows(meta))]
    md.append(f"\nTotal {res.seconds:.0f} s, peak memory {res.peak_rss_gib:.2f} GiB.\n")
    write_atomic(out / "report.md", lambda tmp: tmp.write_text("\n".join(md)))

    quality = "".join(f"<h3>{html.escape(n)}</h3>{_html_table(QUALITY_HEAD, _quality_rows(m))}" for n, m in runs.items())
    cards = "".join(
        f'<figure><img src="{html.escape(p)}" alt="feature {at.feature}"><figcaption>feature {at.feature}: '
        f'{html.escape(at.attribute)}</figcaption></figure>'
        for at, p in zip(res.attributes, res.grids))
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>saeshare demo report</title>
<style>
body{{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1d2330}}
h1{{margin-bottom:.2em}} .headline{{background:#eef4ff;border-left:4px solid #3b6fd8;padding:.7em 1em;font-weight:600}}
table{{border-collapse:collapse;margin:.6em 0 1.4em;font-size:14px}} th,td{{border-bottom:1px solid #dde2ea;padding:.3em .7em;text-align:right}}
th{{background:#f5f7fa}} td:first-child,th:first-child{{text-align:left}}
.plots{{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}} .plots img{{max-width:min(100%,520px);margin:.4em 0}} .grids{{display:flex;flex-wrap:wrap;gap:12px}}
figure{{margin:0;width:200px}} figure img{{width:200px;border-radius:4px}} figcaption{{font-size:13px;color:#555}}
</style></head><body>
<h1>saeshare demo report</h1><p>{html.escape(INTRO)} {html.escape(settings(res))}</p>
<p class="headline">{html.escape(headline(res))}</p><p>{html.escape(READING)}</p>
<h2>Runs</h2>{_html_table(RUN_HEAD, s["run_rows"])}
<h2>wMPPC (row &rarr; column; all layers / last layer)</h2>{_html_table(["source"] + s["names"], s["wm_rows"])}
<div class="plots"><img src="wmppc_runs.png" alt="wMPPC between runs"><img src="wmppc_{IMAGE}_{TEXT}.png" alt="layer pairs">
<img src="wmppc_{IMAGE}_{NULL}.png" alt="layer pairs, null"></div>
<h2>Top shared features of <code>{IMAGE}</code> (last layer)</h2>{_html_table(FEAT_HEAD, s["feat_rows"])}
<div class="grids">{cards}</div><p><a href="{html.escape(res.gallery)}">Open the feature gallery</a></p>
<h2>SAE quality per layer</h2>{quality}
<p>Total {res.seconds:.0f} s, peak memory {res.peak_rss_gib:.2f} GiB.</p></body></html>"""
    write_atomic(out / "report.html", lambda tmp: tmp.write_text(page))


def summary(res: DemoResults, out: Path) -> str:
    best = "; ".join(f"#{at.feature} ~ {at.attribute} (r={at.r:.2f})" for at in res.attributes[:3])
    return (f"report: {out / 'report.html'} (and report.md)\n{headline(res)}\n"
            f"top shared {IMAGE} features: {best}\n"
            f"{res.seconds:.0f} s, peak memory {res.peak_rss_gib:.2f} GiB")
