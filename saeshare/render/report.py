"""The demo's report: report.md and a static report.html (no network) from demo.py's results."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from saeshare.render.figures import plot_heatmap, pyplot, save
from saeshare.disk.files import write_atomic
from ontology import KINDS as ONTOLOGY_KINDS
from ood import RAW_SCORES as RAW_OOD_SCORES
from ood import SAE_SCORES as SAE_OOD_SCORES
from ood import SCORES as OOD_SCORES
from probe import KINDS as PROBE_KINDS
from saeshare.disk.results import MEASURES, DemoResults, ProbeResults, SaeProbes, Similarity, StudyResults, Wmppc
from saeshare.disk.runs import RunMeta

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
    return {"run_rows": run_rows, "wm_rows": wm_rows, "feat_rows": feat_rows, "names": names,
            "cal_rows": [_calibration_row(pair, res.wmppc, res.similarity) for pair in res.wmppc]}


CAL_HEAD = ["pair (A -> B)", "wMPPC all layers [95% CI]", "floor", "ceiling", "wMPPC last layer [95% CI]",
            *(f"{m} (floor)" for m in MEASURES)]


def _calibration_row(pair: str, wmppc: dict[str, Wmppc], similarity: dict[str, Similarity]) -> list[str]:
    w, sim = wmppc[pair], similarity.get(pair)

    def score(key: str) -> str:
        ci = getattr(w.ci, key) if w.ci else None
        return f"{getattr(w, key):.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return [pair, score("all_layers"), f"{w.floor.all_layers:.3f}" if w.floor else "–",
            f"{w.ceiling.all_layers:.3f}" if w.ceiling else "–", score("last_layer"),
            *(f"{sim.measures[m].last_layer:.3f} ({sim.floor[m]:.3f})" if sim else "–" for m in MEASURES)]


def checks(res: DemoResults) -> list[tuple[bool, str]]:
    """What must hold for the numbers to be trusted: the text model above the null on every measure,
    each run's seed ceiling above each of its cross-model scores."""
    text, null = f"{IMAGE}->{TEXT}", f"{IMAGE}->{NULL}"
    out = [(res.wmppc[text].all_layers > res.wmppc[null].all_layers,
            f"wMPPC ranks {text} ({res.wmppc[text].all_layers:.3f}) above {null} ({res.wmppc[null].all_layers:.3f})")]
    for m in MEASURES:
        a, b = res.similarity[text].measures[m].last_layer, res.similarity[null].measures[m].last_layer
        out.append((a > b, f"{m} ranks {text} ({a:.3f}) above {null} ({b:.3f})"))
    for name in res.runs:
        cross = {p: w.all_layers for p, w in res.wmppc.items() if p.startswith(f"{name}->")}
        ceiling = res.wmppc[next(iter(cross))].ceiling.all_layers
        out.append((all(ceiling > v for v in cross.values()),
                    f"seed ceiling of {name} ({ceiling:.3f}) above its cross-model scores "
                    f"({', '.join(f'{v:.3f}' for v in cross.values())})"))
    return out


def calibration_figure(pairs: dict[str, Wmppc], similarities: dict[str, Similarity], path: Path) -> None:
    """One panel per score: each pair's score as a point (wMPPC with its interval), its floor and
    ceiling as marks."""
    plt = pyplot()
    names = list(pairs)
    panels = [("wMPPC (all layers)", [pairs[p].all_layers for p in names], [pairs[p].floor.all_layers for p in names],
               [pairs[p].ceiling.all_layers if pairs[p].ceiling else np.nan for p in names],
               [pairs[p].ci.all_layers for p in names] if all(pairs[p].ci for p in names) else None)]
    panels += [(f"{m} (last layer)", [similarities[p].measures[m].last_layer for p in names],
                [similarities[p].floor[m] for p in names], [similarities[p].ceiling[m] for p in names], None)
               for m in MEASURES if similarities]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 0.45 * len(names) + 1.6), sharey=True,
                             squeeze=False)
    axes = axes[0]
    y = np.arange(len(names))
    for ax, (title, score, floor, ceiling, ci) in zip(axes, panels):
        if ci is not None:
            lo, hi = np.array(ci).T
            ax.errorbar(score, y, xerr=[np.array(score) - lo, hi - np.array(score)], fmt="none", ecolor="#3b6fd8")
        ax.scatter(floor, y, marker="|", s=160, color="#c0392b", label="floor")
        ax.scatter(ceiling, y, marker="|", s=160, color="#27ae60", label="ceiling")
        ax.scatter(score, y, color="#1d2330", zorder=3, label="score")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(min(0.0, np.nanmin(floor) - 0.05), 1.05)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right", fontsize=8)
    save(fig, path, 130)


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


CALIBRATION = ("wMPPC with its 95% jackknife interval (10 blocks of samples), its floor (B's samples permuted: "
               "chance) and its ceiling (A's SAE seed 0 against seed 1: what SAE randomness alone allows); beside it "
               "the classic measures on the last layers' pooled activations, each with its permutation floor "
               "(their ceiling is 1).")


def settings(res: DemoResults) -> str:
    sae = next(iter(res.runs.values())).sae
    batches = ", ".join(f"{n}: {m.sae.batch_size}" for n, m in res.runs.items())
    return (f"SAE settings: top_k {sae.top_k}, expansion factor {sae.expansion_factor}, lr {sae.lr:g}, "
            f"one epoch; batch ({batches}). The paper's lr 5e-5 is tuned for COCO's thousands of steps; "
            "`uv run demo.py --paper_defaults` uses it.")


PROBES_INTRO = ("After Olson et al. (arXiv 2508.11277). Probes: logistic regressions trained on the run's samples and "
                "tested on held-out samples recorded with record.py (never seen by the SAEs), on the SAE's codes (`sae`), "
                "the raw pooled activations (`raw`), ReLU random features of the SAE's width (`random`), and the 16 "
                "best single features or neurons (`*_top`); balanced accuracy, mean over the labels. Shifted: trained on "
                "samples with a circle, tested on samples with a square. OOD: runs trained without stars and purple "
                "shapes score held-out stars and purple shapes against held-out in-distribution samples (AUROC; below "
                "0.5 the score ranks the sets the other way round). Ontology: the share of the hierarchy's nodes "
                "(warm / cool / achromatic colours, round / angular / pointed shapes, sizes) that one feature detects "
                "with AUROC >= 0.9, and the mean depth of the lowest common ancestor of each feature's top samples; "
                "`null`: the SAE's codes with the samples permuted.")


def _probe_tables(p: SaeProbes) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, head, rows) of each table of the SAE probes section."""
    def acc_rows(by_run: dict[str, ProbeResults]) -> list[list[str]]:
        return [[name, str(layer), *(f"{np.nanmean(r.balanced_accuracy[k][i]):.3f}" for k in PROBE_KINDS)]
                for name, r in by_run.items() for i, layer in enumerate(r.layers)]

    first = next(iter(p.probes.values()))
    shift = next(iter(p.shifted.values()))
    ood_rows = [[name, o.ood, str(layer), *(f"{o.metrics[sc]['auroc'][i]:.3f}" for sc in OOD_SCORES)]
                for name, sets in p.ood.items() for o in sets for i, layer in enumerate(o.layers)]
    onto_rows = [[name, str(layer), *(f"{o.coverage[k][i]:.2f}" for k in ONTOLOGY_KINDS),
                  *(f"{o.mean_lca_depth[k][i]:.2f}" for k in ONTOLOGY_KINDS)]
                 for name, o in p.ontology.items() for i, layer in enumerate(o.layers)]
    return [(f"Probes in distribution ({', '.join(first.labels)}): balanced accuracy", ["run", "layer", *PROBE_KINDS],
             acc_rows(p.probes)),
            (f"Probes under a shift ({', '.join(shift.labels)}; train {' '.join(shift.train_where)}, test "
             f"{' '.join(shift.test_where)})", ["run", "layer", *PROBE_KINDS], acc_rows(p.shifted)),
            ("OOD detection: AUROC", ["run", "OOD set", "layer", *OOD_SCORES], ood_rows),
            ("Ontology: coverage and LCA depth", ["run", "layer", *(f"coverage {k}" for k in ONTOLOGY_KINDS),
                                                  *(f"LCA depth {k}" for k in ONTOLOGY_KINDS)], onto_rows)]


def probe_findings(p: SaeProbes) -> list[str]:
    """Which of SAE or raw wins where, in words."""
    out = []
    for name, r in p.probes.items():
        for what, res in (("in distribution", r), ("shifted", p.shifted[name])):
            sae, raw, rnd = (np.nanmean(res.balanced_accuracy[k], 1) for k in ("sae", "raw", "random"))
            wins = [str(layer) for layer, a, b in zip(res.layers, sae, raw) if a > b]
            out.append(f"{name} probes {what}: SAE above raw at layers {', '.join(wins) or 'none'} of "
                       f"{', '.join(map(str, res.layers))}; random features of the same width "
                       f"{'match or beat' if (rnd >= sae - 0.005).all() else 'fall below'} the SAE")
        for o in p.ood[name]:
            best = {sc: max(o.metrics[sc]["auroc"]) for sc in OOD_SCORES}
            top = max(best, key=best.get)
            out.append(f"{name} OOD {o.ood}: best score {top} (AUROC {best[top]:.3f}); best SAE score "
                       f"{max(best[s] for s in SAE_OOD_SCORES):.3f}, best raw {max(best[s] for s in RAW_OOD_SCORES):.3f}")
        o = p.ontology[name]
        out.append(f"{name} ontology coverage, last probed layer: sae {o.coverage['sae'][-1]:.2f}, raw "
                   f"{o.coverage['raw'][-1]:.2f}, null {o.coverage['null'][-1]:.2f}")
    return out


def probes_figure(p: SaeProbes, path: Path) -> None:
    """Per run: probe accuracy (in distribution, shifted), OOD AUROC of the held-out sets, ontology coverage."""
    plt = pyplot()
    names = list(p.probes)
    fig, axes = plt.subplots(len(names), 4, figsize=(16, 3.3 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for ax, res, title in ((row[0], p.probes[name], "probes"), (row[1], p.shifted[name], "probes, shifted")):
            for k in PROBE_KINDS:
                ax.plot(res.layers, np.nanmean(res.balanced_accuracy[k], 1), marker="o", label=k)
            ax.set_title(f"{name}: {title}", fontsize=10)
            ax.set_ylabel("balanced accuracy")
        for o, ls in zip(p.ood[name], ("-", "--")):
            for sc, colour in zip(OOD_SCORES, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
                row[2].plot(o.layers, o.metrics[sc]["auroc"], ls=ls, color=colour, marker=".",
                            label=f"{sc} ({o.ood.rsplit('_', 1)[-1]})")
        row[2].set_title(f"{name}: OOD AUROC", fontsize=10)
        o = p.ontology[name]
        for k in ONTOLOGY_KINDS:
            row[3].plot(o.layers, o.coverage[k], marker="o", label=k)
        row[3].set_title(f"{name}: ontology coverage", fontsize=10)
        for ax in row:
            ax.set_xlabel("layer")
            ax.legend(fontsize=6)
    save(fig, path, 110)


def _probes_html(p: SaeProbes | None) -> str:
    if p is None:
        return ""
    tables = "".join(f"<h3>{html.escape(title)}</h3>{_html_table(head, rows)}" for title, head, rows in _probe_tables(p))
    findings = "".join(f"<li>{html.escape(line)}</li>" for line in probe_findings(p))
    return (f"<h2>SAE probes: probes, OOD detection, ontology</h2><p>{html.escape(PROBES_INTRO)}</p><ul>{findings}</ul>"
            f'<div class="plots"><img src="probes.png" alt="SAE probes" style="max-width:100%"></div>{tables}')


STYLE = """<style>
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1d2330}
h1{margin-bottom:.2em} .headline{background:#eef4ff;border-left:4px solid #3b6fd8;padding:.7em 1em;font-weight:600}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:14px} th,td{border-bottom:1px solid #dde2ea;padding:.3em .7em;text-align:right}
th{background:#f5f7fa} td:first-child,th:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} .plots img{max-width:min(100%,520px);margin:.4em 0} .grids{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:200px} figure img{width:200px;border-radius:4px} figcaption{font-size:13px;color:#555}
</style>"""
"""The report pages' stylesheet."""


def write(res: DemoResults, out: Path) -> None:
    s = _sections(res)
    runs = res.runs
    md = [f"# saeshare demo report\n\n{INTRO} {settings(res)}\n\n**{headline(res)}**\n\n{READING}\n",
          "## Runs\n", _md_table(RUN_HEAD, s["run_rows"]),
          "\n## wMPPC (row -> column; all layers / last layer)\n", _md_table(["source"] + s["names"], s["wm_rows"]),
          f"\n![wMPPC between runs](wmppc_runs.png)\n![{IMAGE} -> {TEXT} per layer pair](wmppc_{IMAGE}_{TEXT}.png)"
          f"\n![{IMAGE} -> {NULL} per layer pair](wmppc_{IMAGE}_{NULL}.png)\n",
          "\n## Calibrated comparison (every ordered pair)\n", CALIBRATION, "\n", _md_table(CAL_HEAD, s["cal_rows"]),
          "\n![scores, floors and ceilings](calibration.png)\n", "\nChecks:\n",
          *(f"- {'ok' if ok else 'FAILED'}: {text}" for ok, text in checks(res)),
          "\nSAE layers that do not fit the recorded pooled token (fvu_pooled > 1):\n",
          *(f"- {w}" for w in res.poor_fits or ["none"]),
          f"\n## Top shared features of `{IMAGE}` (last layer)\n", _md_table(FEAT_HEAD, s["feat_rows"]),
          f"\nPreviews: [{res.gallery}]({res.gallery})\n"]
    if res.probes is not None:
        md += ["\n## SAE probes: probes, OOD detection, ontology\n", PROBES_INTRO, "",
               *(f"- {line}" for line in probe_findings(res.probes)), "\n![SAE probes](probes.png)\n"]
        md += [f"\n### {title}\n\n{_md_table(head, rows)}" for title, head, rows in _probe_tables(res.probes)]
    for name, meta in runs.items():
        md += [f"\n## SAE quality: `{name}`\n", _md_table(QUALITY_HEAD, _quality_rows(meta))]
    md.append(f"\nTotal {res.seconds:.0f} s, peak memory {res.peak_rss_gib:.2f} GiB.\n")
    write_atomic(out / "report.md", lambda tmp: tmp.write_text("\n".join(md)))
    if res.probes is not None:
        probes_figure(res.probes, out / "probes.png")

    quality = "".join(f"<h3>{html.escape(n)}</h3>{_html_table(QUALITY_HEAD, _quality_rows(m))}" for n, m in runs.items())
    cards = "".join(
        f'<figure><img src="{html.escape(p)}" alt="feature {at.feature}"><figcaption>feature {at.feature}: '
        f'{html.escape(at.attribute)}</figcaption></figure>'
        for at, p in zip(res.attributes, res.grids))
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>saeshare demo report</title>
{STYLE}</head><body>
<h1>saeshare demo report</h1><p>{html.escape(INTRO)} {html.escape(settings(res))}</p>
<p class="headline">{html.escape(headline(res))}</p><p>{html.escape(READING)}</p>
<h2>Runs</h2>{_html_table(RUN_HEAD, s["run_rows"])}
<h2>wMPPC (row &rarr; column; all layers / last layer)</h2>{_html_table(["source"] + s["names"], s["wm_rows"])}
<div class="plots"><img src="wmppc_runs.png" alt="wMPPC between runs"><img src="wmppc_{IMAGE}_{TEXT}.png" alt="layer pairs">
<img src="wmppc_{IMAGE}_{NULL}.png" alt="layer pairs, null"></div>
<h2>Calibrated comparison (every ordered pair)</h2><p>{html.escape(CALIBRATION)}</p>{_html_table(CAL_HEAD, s["cal_rows"])}
<div class="plots"><img src="calibration.png" alt="scores, floors and ceilings" style="max-width:100%"></div>
<h3>Checks</h3><ul>{"".join(f"<li>{'ok' if ok else '<b>FAILED</b>'}: {html.escape(t)}</li>" for ok, t in checks(res))}</ul>
<h3>SAE layers that do not fit the recorded pooled token (fvu_pooled &gt; 1)</h3>
<ul>{"".join(f"<li>{html.escape(w)}</li>" for w in res.poor_fits or ["none"])}</ul>
<h2>Top shared features of <code>{IMAGE}</code> (last layer)</h2>{_html_table(FEAT_HEAD, s["feat_rows"])}
<div class="grids">{cards}</div><p><a href="{html.escape(res.gallery)}">Open the feature gallery</a></p>
{_probes_html(res.probes)}<h2>SAE quality per layer</h2>{quality}
<p>Total {res.seconds:.0f} s, peak memory {res.peak_rss_gib:.2f} GiB.</p></body></html>"""
    write_atomic(out / "report.html", lambda tmp: tmp.write_text(page))


def summary(res: DemoResults, out: Path) -> str:
    best = "; ".join(f"#{at.feature} ~ {at.attribute} (r={at.r:.2f})" for at in res.attributes[:3])
    failed = [text for ok, text in checks(res) if not ok]
    return (f"report: {out / 'report.html'} (and report.md)\n{headline(res)}\n"
            f"top shared {IMAGE} features: {best}\n"
            + "".join(f"{p}: wMPPC {w.all_layers:.3f} [{w.ci.all_layers[0]:.3f}, {w.ci.all_layers[1]:.3f}], floor "
                      f"{w.floor.all_layers:.3f}, ceiling {w.ceiling.all_layers:.3f}; "
                      + ", ".join(f"{m} {res.similarity[p].measures[m].last_layer:.3f}" for m in MEASURES) + "\n"
                      for p, w in res.wmppc.items())
            + (f"checks FAILED: {'; '.join(failed)}\n" if failed else "checks: all passed\n")
            + f"{len(res.poor_fits)} SAE layers fit the recorded pooled token worse than its mean\n"
            + "".join(f"{line}\n" for line in (probe_findings(res.probes) if res.probes else []))
            + f"{res.seconds:.0f} s, peak memory {res.peak_rss_gib:.2f} GiB")


# ---- a study's report (study.py): the demo's, for N runs ---------------------------------------------------
STUDY_RUN_HEAD = ["run", "model", "checkpoint", "modality", "token", "layers", "samples", "SAE seeds", "note"]


def _study_runs(res: StudyResults) -> list[list[str]]:
    note = lambda m: ("captions shuffled (null)" if m.dataset.shuffle_captions is not None  # noqa: E731
                      else "random init (floor)" if m.random_init else "")
    return [[n, m.model, html.escape(Path(m.checkpoint).name), m.modality, m.token, str(len(m.layers)),
             str(m.dataset.n_samples), " ".join(map(str, m.sae.seeds)), note(m)] for n, m in res.runs.items()]


def _group_rows(rep) -> list[list[str]]:
    return [[str(f.feature), f"{f.delta:.4g}", f"{f.mass:.4g}",
             *(f"{f.rho[n]:+.3f} (#{f.match[n]})" for n in [*rep.min_group, *rep.max_group])] for f in rep.features]


def _study_figures(res: StudyResults, out: Path) -> list[str]:
    """The figures, written under out; their paths relative to it."""
    names = list(res.runs)
    plot_heatmap(res.table.all_layers, names, names, "source", "target", "wMPPC, all layers", out / "wmppc_runs.png")
    figs = ["wmppc_runs.png"]
    if all(w.floor is not None for w in res.wmppc.values()):
        calibration_figure(res.wmppc, res.similarity, out / "calibration.png")
        figs.append("calibration.png")
    (out / "pairs").mkdir(exist_ok=True)
    for pair, w in res.wmppc.items():
        rel = f"pairs/wmppc_{w.source}_{w.target}.png"
        plot_heatmap(w.layer_matrix, [str(x) for x in w.source_layers], [str(x) for x in w.target_layers],
                     f"{w.source} layer", f"{w.target} layer", f"wMPPC {pair}", out / rel)
        figs.append(rel)
    return figs


def write_study(res: StudyResults, out: Path) -> None:
    """<out>/report.md and report.html of a study: runs, the wMPPC matrix, calibration, per-pair layer
    heatmaps, and each Comparative Sharedness group with its previews."""
    names = list(res.runs)
    figs = _study_figures(res, out)
    t = res.table
    wm_rows = [[a] + [f"{t.all_layers[i, j]:.3f} / {t.last_layer[i, j]:.3f}" if i != j else "–"
                      for j in range(len(names))] for i, a in enumerate(names)]
    cal_rows = [_calibration_row(pair, res.wmppc, res.similarity) for pair in res.wmppc]
    groups = [(f"{rep.source}: shared with {', '.join(rep.min_group)}, not with {', '.join(rep.max_group)}",
               ["feature", "Delta", "mass S", *(f"rho -> {n} (match)" for n in [*rep.min_group, *rep.max_group])],
               _group_rows(rep), gallery, grids)
              for rep, gallery, grids in zip(res.sharedness, res.galleries, res.grids)]
    md = [f"# saeshare study: {out.name}\n", f"{len(names)} runs, codes `{t.codes}`.\n", "## Runs\n",
          _md_table(STUDY_RUN_HEAD, _study_runs(res)), "\n## wMPPC (row -> column; all layers / last layer)\n",
          _md_table(["source", *names], wm_rows), "\n## Calibration (every ordered pair)\n", CALIBRATION, "\n",
          _md_table(CAL_HEAD, cal_rows), "", *(f"![{f}]({f})" for f in figs)]
    for title, head, rows, gallery, grids in groups:
        md += [f"\n## Comparative Sharedness: {title}\n", _md_table(head, rows), "",
               *(f"![feature {r[0]}]({g})" for r, g in zip(rows, grids)), f"\nPreviews: [{gallery}]({gallery})"]
    write_atomic(out / "report.md", lambda tmp: tmp.write_text("\n".join(md) + "\n"))
    group_html = "".join(
        f"<h2>Comparative Sharedness: {html.escape(title)}</h2>{_html_table(head, rows)}<div class=\"grids\">"
        + "".join(f'<figure><img src="{html.escape(g)}" alt="feature {r[0]}"><figcaption>feature {r[0]}</figcaption>'
                  "</figure>" for r, g in zip(rows, grids))
        + f'</div><p><a href="{html.escape(gallery)}">open the gallery</a></p>' for title, head, rows, gallery, grids in groups)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>saeshare study {html.escape(out.name)}</title>
{STYLE}</head><body><h1>saeshare study: {html.escape(out.name)}</h1>
<h2>Runs</h2>{_html_table(STUDY_RUN_HEAD, _study_runs(res))}
<h2>wMPPC (row &rarr; column; all layers / last layer)</h2>{_html_table(["source", *names], wm_rows)}
<h2>Calibration (every ordered pair)</h2><p>{html.escape(CALIBRATION)}</p>{_html_table(CAL_HEAD, cal_rows)}
<div class="plots">{"".join(f'<img src="{html.escape(f)}" alt="{html.escape(f)}">' for f in figs)}</div>
{group_html}</body></html>"""
    write_atomic(out / "report.html", lambda tmp: tmp.write_text(page))


def study_summary(res: StudyResults, out: Path) -> str:
    return (f"report: {out / 'report.html'} (and report.md)\n"
            + "".join(f"{pair}: wMPPC all layers {w.all_layers:.3f}, last layer {w.last_layer:.3f}"
                      + (f", floor {w.floor.all_layers:.3f}" if w.floor else "")
                      + (f", ceiling {w.ceiling.all_layers:.3f}" if w.ceiling else "") + "\n"
                      for pair, w in res.wmppc.items()).rstrip())
