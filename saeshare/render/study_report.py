"""A study's report (study.py): the demo's, for any number of runs and Comparative Sharedness groups."""
from __future__ import annotations

from pathlib import Path

from saeshare.disk.results import StudyResults
from saeshare.render.calibration import calibration_figure, calibration_sections
from saeshare.render.figures import plot_heatmap
from saeshare.render.joint import joint_findings, joint_sections
from saeshare.render.modality import mllm_sections
from saeshare.render.sections import Grids, Heading, Images, Link, Section, Table, Text, write_report

STUDY_RUN_HEAD = ["run", "model", "checkpoint", "modality", "token", "layers", "samples", "SAE seeds", "note"]


def _study_runs(res: StudyResults) -> list[list[str]]:
    note = lambda m: ("captions shuffled (null)" if m.dataset.shuffle_captions is not None  # noqa: E731
                      else "random init (floor)" if m.random_init else "")
    return [[n, m.model, Path(m.checkpoint).name, m.modality, m.token, str(len(m.layers)),
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


def sections(res: StudyResults, figures: list[str], folder: Path) -> list[Section]:
    names, t = list(res.runs), res.table
    wm_rows = [[a] + [f"{t.all_layers[i, j]:.3f} / {t.last_layer[i, j]:.3f}" if i != j else "–"
                      for j in range(len(names))] for i, a in enumerate(names)]
    out: list[Section] = [
        Text(f"{len(names)} runs, codes `{t.codes}`."), Heading("Runs"), Table(STUDY_RUN_HEAD, _study_runs(res)),
        Heading("wMPPC (row -> column; all layers / last layer)"), Table(["source", *names], wm_rows),
        Heading("Calibration (every ordered pair)"), *calibration_sections(res.wmppc, res.similarity),
        Images([(f, f) for f in figures])]
    for rep, gallery, grids in zip(res.sharedness, res.galleries, res.grids):
        others = [*rep.min_group, *rep.max_group]
        rows = _group_rows(rep)
        out += [Heading(f"Comparative Sharedness: {rep.source}: shared with {', '.join(rep.min_group)}, "
                        f"not with {', '.join(rep.max_group)}"),
                Table(["feature", "Delta", "mass S", *(f"rho -> {n} (match)" for n in others)], rows),
                Grids([(g, f"feature {r[0]}", f"feature {r[0]}") for r, g in zip(rows, grids)]),
                Link(gallery, "open the gallery")]
    return out + mllm_sections(res.runs, res.wmppc, folder) + joint_sections(res.joint)


def write(res: StudyResults, out: Path) -> None:
    """<out>/report.md and report.html of a study: runs, the wMPPC matrix, calibration, per-pair layer
    heatmaps, and each Comparative Sharedness group with its previews."""
    write_report(out, f"saeshare study: {out.name}", sections(res, _study_figures(res, out), out))


def summary(res: StudyResults, out: Path) -> str:
    return (f"report: {out / 'report.html'} (and report.md)\n"
            + "".join(f"{pair}: wMPPC all layers {w.all_layers:.3f}, last layer {w.last_layer:.3f}"
                      + (f" (corrected {w.corrected.all_layers:.3f}, {w.corrected.last_layer:.3f})"
                         if w.corrected else "")
                      + (f", floor {(w.floor.corrected or w.floor).all_layers:.3f}" if w.floor else "")
                      + (f", ceiling {(w.ceiling.corrected or w.ceiling).all_layers:.3f}" if w.ceiling else "") + "\n"
                      for pair, w in res.wmppc.items())
            + "".join(f"{line}\n" for line in joint_findings(res.joint))).rstrip()
