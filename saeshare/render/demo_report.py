"""The demo's report (demo.py): report.md and report.html from DemoResults, and the summary it prints."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from saeshare.disk.results import (
    IMAGE,
    MEASURES,
    NULL,
    ONTOLOGY_KINDS,
    OOD_SCORES,
    PROBE_KINDS,
    RAW_OOD_SCORES,
    SAE_OOD_SCORES,
    TEXT,
    DemoLabels,
    DemoResults,
    ProbeResults,
    SaeProbes,
    Wmppc,
)
from saeshare.disk.runs import RunMeta
from saeshare.render.calibration import calibration_sections
from saeshare.render.figures import pyplot, save
from saeshare.render.joint import joint_findings, joint_sections
from saeshare.render.sections import Bullets, Grids, Heading, Images, Link, Section, Table, Text, write_report


def _quality_rows(meta: RunMeta) -> list[list[str]]:
    return [[str(layer), str(i.d_model), str(i.n_features), f"{i.fvu:.3f}", f"{i.fvu_pooled:.3f}",
             f"{i.l0:.1f}", f"{i.dead_fraction:.3f}", f"{i.tokens_seen:,}"]
            for layer, i in ((layer, meta.layer_info[layer]) for layer in meta.layers)]


QUALITY_HEAD = ["layer", "d", "features", "FVU (training)", "FVU (pooled)", "L0", "dead", "tokens"]


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


RUN_HEAD = ["run", "model", "checkpoint", "modality", "token", "layers", "samples", "note", "train s"]
FEAT_HEAD = ["feature", "Delta", "mass S", f"rho -> {TEXT} (match)", f"rho -> {NULL} (match)",
             f"best attribute of {IMAGE} feature", f"best attribute of matched {TEXT} feature"]


def _with_correction(w: Wmppc, key: str) -> str:
    value = f"{getattr(w, key):.3f}"
    if w.corrected is None:
        return value
    lo, hi = getattr(w.ci, key)
    return f"{value} (corrected {getattr(w.corrected, key):.3f} [{lo:.3f}, {hi:.3f}])"


def headline(res: DemoResults) -> str:
    """wMPPC of the image run against the text and null runs, on the layers whose SAEs fit their token."""
    scores = res.headline or res.wmppc
    text, null = scores[f"{IMAGE}->{TEXT}"], scores[f"{IMAGE}->{NULL}"]
    left = "; ".join(f"{n} layers {', '.join(map(str, v))}" for n, v in res.left_out.items())
    return (f"wMPPC {IMAGE} -> {TEXT}: all layers {_with_correction(text, 'all_layers')}, last layer "
            f"{_with_correction(text, 'last_layer')}; {IMAGE} -> {NULL} (null): all layers "
            f"{_with_correction(null, 'all_layers')}, last layer {_with_correction(null, 'last_layer')}"
            + (f"; left out (SAEs that do not fit the recorded token): {left}" if left else ""))


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


PROBES_INTRO = ("After Olson et al. (arXiv 2508.11277). Probes: logistic regressions trained on the run's samples "
                "and tested on held-out samples recorded with record.py (never seen by the SAEs), on the SAE's codes "
                "(`sae`), the raw pooled activations (`raw`), ReLU random features of the SAE's width (`random`), and "
                "the 16 best single features or neurons (`*_top`); balanced accuracy, mean over the labels. Shifted: "
                "trained on samples with a circle, tested on samples with a square. OOD: runs trained without stars "
                "and purple shapes score held-out stars and purple shapes against held-out in-distribution samples "
                "(AUROC; below 0.5 the score ranks the sets the other way round). Ontology: the share of the "
                "hierarchy's nodes (warm / cool / achromatic colours, round / angular / pointed shapes, sizes) that "
                "one feature detects with AUROC >= 0.9, and the mean depth of the lowest common ancestor of each "
                "feature's top samples; `null`: the SAE's codes with the samples permuted.")


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


def _random_verdict(layers: list[int], sae: np.ndarray, rnd: np.ndarray) -> str:
    """Where random features of the SAE's width match or beat it (within half a point), layer by layer."""
    match = [str(layer) for layer, a, r in zip(layers, sae, rnd) if r >= a - 0.005]
    below = [str(layer) for layer, a, r in zip(layers, sae, rnd) if r < a - 0.005]
    if not below:
        return "match or beat the SAE at every layer"
    if not match:
        return "fall below the SAE at every layer"
    return f"match or beat the SAE at layers {', '.join(match)} and fall below it at {', '.join(below)}"


def probe_findings(p: SaeProbes) -> list[str]:
    """Which of SAE or raw wins where, in words."""
    out = []
    for name, r in p.probes.items():
        for what, res in (("in distribution", r), ("shifted", p.shifted[name])):
            sae, raw, rnd = (np.nanmean(res.balanced_accuracy[k], 1) for k in ("sae", "raw", "random"))
            wins = [str(layer) for layer, a, b in zip(res.layers, sae, raw) if a > b]
            out.append(f"{name} probes {what}: SAE above raw at layers {', '.join(wins) or 'none'} of "
                       f"{', '.join(map(str, res.layers))}; random features of the same width "
                       + _random_verdict(res.layers, sae, rnd))
        for o in p.ood[name]:
            best = {sc: max(o.metrics[sc]["auroc"]) for sc in OOD_SCORES}
            top = max(best, key=best.get)
            sae, raw = max(best[s] for s in SAE_OOD_SCORES), max(best[s] for s in RAW_OOD_SCORES)
            out.append(f"{name} OOD {o.ood}: best score {top} (AUROC {best[top]:.3f}); best SAE score {sae:.3f}, "
                       f"best raw {raw:.3f}")
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


def _probe_sections(p: SaeProbes) -> list[Section]:
    out: list[Section] = [Heading("SAE probes: probes, OOD detection, ontology"), Text(PROBES_INTRO),
                          Bullets(probe_findings(p)), Images([("probes.png", "SAE probes")], wide=True)]
    for title, head, rows in _probe_tables(p):
        out += [Heading(title, 3), Table(head, rows)]
    return out


def label_findings(lab: DemoLabels) -> str:
    """The labels' two checks in one line: do matched features mean the same, are features named right."""
    agree = "; ".join(f"with `{n}` {a.share:.2f} of {a.n_pairs} (shuffled matches {a.floor:.2f})"
                      for n, a in lab.agreement.items())
    return (f"Labels (labels.py): the top shared features and their best matches carry the same label {agree}. "
            f"Of the {lab.n_top} {IMAGE} features with the largest activation mass, {lab.ground_truth:.2f} are "
            f"labelled by the shapes attribute they correlate with best (labels shuffled among them: "
            f"{lab.ground_truth_floor:.2f}).")


def sections(res: DemoResults) -> list[Section]:
    """The report's content, once: rendered to Markdown and HTML by `write`."""
    names, w = list(res.runs), res.wmppc
    run_rows = [[n, m.model, Path(m.checkpoint).name, m.modality, m.token, str(len(m.layers)), str(m.dataset.n_samples),
                 "captions shuffled (null)" if m.dataset.shuffle_captions is not None else "",
                 f"{res.train_seconds[n]:.0f}"] for n, m in res.runs.items()]
    wm_rows = [[a] + [f"{w[f'{a}->{b}'].all_layers:.3f} / {w[f'{a}->{b}'].last_layer:.3f}" if a != b else "–"
                      for b in names] for a in names]
    feat_rows = [[str(f.feature), f"{f.delta:.4g}", f"{f.mass:.4g}",
                  f"{f.rho[TEXT]:+.3f} (#{f.match[TEXT]})", f"{f.rho[NULL]:+.3f} (#{f.match[NULL]})",
                  f"{at.attribute} (r={at.r:.2f})", f"{at.match_attribute} (r={at.match_r:.2f})"]
                 for f, at in zip(res.sharedness.features, res.attributes)]
    done = checks(res)
    out: list[Section] = [
        Text(f"{INTRO} {settings(res)}"), Text(headline(res), emphasis=True), Text(READING),
        Heading("Runs"), Table(RUN_HEAD, run_rows),
        Heading("wMPPC (row -> column; all layers / last layer)"), Table(["source", *names], wm_rows),
        Images([("wmppc_runs.png", "wMPPC between runs"),
                (f"wmppc_{IMAGE}_{TEXT}.png", f"{IMAGE} -> {TEXT} per layer pair"),
                (f"wmppc_{IMAGE}_{NULL}.png", f"{IMAGE} -> {NULL} per layer pair")]),
        Heading("Calibrated comparison (every ordered pair)"), *calibration_sections(res.wmppc, res.similarity),
        Images([("calibration.png", "scores, floors and ceilings")], wide=True),
        Bullets([f"{'ok' if ok else 'FAILED'}: {text}" for ok, text in done], "Checks:", [not ok for ok, _ in done]),
        Bullets(res.poor_fits or ["none"], "SAE layers that do not fit the recorded pooled token (fvu_pooled > 1):"),
        Heading(f"Top shared features of `{IMAGE}` (last layer)"), Table(FEAT_HEAD, feat_rows),
        *([Text(label_findings(res.labels))] if res.labels is not None else []),
        Grids([(g, f"feature {at.feature}", f"feature {at.feature}: {at.attribute}")
               for at, g in zip(res.attributes, res.grids)]),
        Link(res.gallery, "Open the feature gallery")]
    out += joint_sections(res.joint)
    if res.probes is not None:
        out += _probe_sections(res.probes)
    for name, meta in res.runs.items():
        out += [Heading(f"SAE quality: `{name}`"), Table(QUALITY_HEAD, _quality_rows(meta))]
    return out + [Text(f"Total {res.seconds:.0f} s, peak memory {res.peak_rss_gib:.2f} GiB.")]


def write(res: DemoResults, out: Path) -> None:
    """<out>/report.md, report.html and the probes' figure."""
    if res.probes is not None:
        probes_figure(res.probes, out / "probes.png")
    write_report(out, "saeshare demo report", sections(res))


def summary(res: DemoResults, out: Path) -> str:
    best = "; ".join(f"#{at.feature} ~ {at.attribute} (r={at.r:.2f})" for at in res.attributes[:3])
    failed = [text for ok, text in checks(res) if not ok]
    return (f"report: {out / 'report.html'} (and report.md)\n{headline(res)}\n"
            f"top shared {IMAGE} features: {best}\n"
            + "".join(f"{p}: wMPPC {_with_correction(w, 'all_layers')}, floor "
                      f"{(w.floor.corrected or w.floor).all_layers:.3f}, "
                      f"ceiling {(w.ceiling.corrected or w.ceiling).all_layers:.3f}; "
                      + ", ".join(f"{m} {res.similarity[p].measures[m].last_layer:.3f}" for m in MEASURES) + "\n"
                      for p, w in res.wmppc.items())
            + "".join(f"{line}\n" for line in map(Wmppc.near_floor, res.wmppc.values()) if line)
            + (f"checks FAILED: {'; '.join(failed)}\n" if failed else "checks: all passed\n")
            + f"{len(res.poor_fits)} SAE layers fit the recorded pooled token worse than its mean\n"
            + (f"{label_findings(res.labels).replace('`', '')}\n" if res.labels is not None else "")
            + "".join(f"{line}\n" for line in joint_findings(res.joint))
            + "".join(f"{line}\n" for line in (probe_findings(res.probes) if res.probes else []))
            + f"{res.seconds:.0f} s, peak memory {res.peak_rss_gib:.2f} GiB")
