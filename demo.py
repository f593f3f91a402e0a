"""The whole method end to end, offline, on two real pretrained models that ship in PyPI packages.

    uv run demo.py                      # shapes x 2000, EfficientNet-Lite0 vs all-MiniLM-L6-v2 vs a null run

1. SAEs on every layer of EfficientNet-Lite0 (images) and all-MiniLM-L6-v2 (the captions of the same
   samples), plus a null run: the same text model over captions shuffled across samples.
2. wMPPC for every ordered pair; Comparative Sharedness of the image model, shared with the text model
   and not with the null run; previews of the top features; their best ground-truth attribute.
3. SAE probes (docs/design.md#probes) of both models: linear probes on held-out samples (in distribution and shifted),
   OOD detection of a shape and a colour that SAEs trained without them never saw, ontology coverage.
4. demo_out/report.html and report.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import data
import labels
import record
from comp_sharedness import comp_sharedness, top_features
from errors import OptionError, check_at_least, check_positive, cli
from joint import SMALL, headline_joints
from ontology import OntologyArgs, load_hierarchy, ontology
from ood import KNN_K, ood
from probe import ProbeArgs, probe
from record import RecordArgs
from sae import SaeConfig
from saeshare.core.distributed import resolve_device
from saeshare.core.options import parse
from saeshare.disk.results import IMAGE, NULL, TEXT, AttributeMatch, DemoLabels, DemoResults, SaeProbes
from saeshare.disk.runs import Run, fitting_layers, poor_fits, warn_run
from saeshare.engine.correlator import Correlator, tqdm_progress
from saeshare.engine.options import EngineOptions
from saeshare.joint.dictionary import JointConfig
from saeshare.render import demo_report
from saeshare.render.calibration import calibration_figure
from saeshare.render.figures import plot_heatmap
from saeshare.training.train import TrainConfig, train, trained_run
from show import GalleryOptions, sharedness_gallery
from similarity import SimilarityEngine
from wmppc import pair_scores, wmppc


@dataclass
class DemoConfig:
    out: str = "demo_out"
    """Folder of the report, the runs (out/sae_features) and the previews (out/imgs)."""
    max_samples: int = 2000
    """Samples of `shapes`."""
    image_size: int = 128
    """Side of the shapes images fed to EfficientNet-Lite0."""
    layers: list[int] | None = None
    """Layers of both models (default: all)."""
    top: int = 8
    """Top shared features shown in the report."""
    lr: float = 1e-3
    """SAE learning rate. The paper's 5e-5 is tuned for COCO (7,400 steps of 16 images); 2,000 samples give
    125 steps of 16 images, or 8 steps of 256 captions, too few for it to move the SAE from its init."""
    batch_size: int | None = 16
    """Encoder batch of both models (the SAE takes one step per batch)."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1])
    """SAE seeds of every run (trained in the same encoder pass): two give each run its seed ceiling."""
    paper_defaults: bool = False
    """The paper's SAE settings: lr 5e-5, batch 16 images and 256 captions."""
    joint: bool = True
    """The joint-dictionary section (joint.py: SPARC and a crosscoder over the image run and each text run;
    --no_joint: skip)."""
    probes: bool = True
    """The SAE probes section (docs/design.md#probes): linear probes, OOD detection, ontology coverage
    (--no_probes: skip)."""
    overwrite: bool = False
    """Replace runs of an earlier demo made with other settings."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""

    def __post_init__(self):
        check_at_least("max_samples", self.max_samples, 20)
        check_at_least("top", self.top, 1)
        check_positive("image_size", self.image_size)
        if len(set(self.seeds)) < 2:
            raise OptionError("seeds", "{opt} takes two or more distinct seeds: the second gives the ceiling")
        if self.paper_defaults:
            self.lr, self.batch_size = SaeConfig.lr, None


JOINT = [JointConfig(method=m, **SMALL) for m in ("sparc", "crosscoder")]
"""The demo's joint dictionaries (studies/demo.toml's [[analyses.joint]])."""

RUNS = {  # name -> (modality, model, checkpoint, extra TrainConfig fields)
    IMAGE: ("image", "EfficientNetLite", "efficientnet-lite0", {}),
    TEXT: ("text", "Bert", "all-MiniLM-L6-v2", {}),
    NULL: ("text", "Bert", "all-MiniLM-L6-v2", {"shuffle_captions": 0}),
}


def _train_or_reuse(cfg: DemoConfig, name: str, root: Path, **changes) -> tuple[Run, float]:
    """A run of an earlier demo with the same settings is reused; other settings need --overwrite.
    `changes`: TrainConfig fields that differ from run `name`'s (another runname, say)."""
    modality, model, checkpoint, extra = RUNS[name]
    tcfg = TrainConfig(runname=name, model=model, checkpoint=checkpoint, layers=cfg.layers, dataset="shapes",
                       max_samples=cfg.max_samples, batch_size=cfg.batch_size, root=str(root),
                       overwrite=cfg.overwrite, device=cfg.device, seeds=cfg.seeds,
                       image_size=cfg.image_size if modality == "image" else None, **extra)
    tcfg = dataclasses.replace(tcfg, **changes)
    sae_cfg = SaeConfig(lr=cfg.lr)
    run = trained_run(tcfg, sae_cfg, modality)
    if run is not None:
        print(f"reusing {run.path} (same settings)")
        return run, 0.0
    res = train(tcfg, sae_cfg, modality)
    return Run.open(root, tcfg.runname), res.seconds


PROBE_LABELS = ["red", "circle", "small"]
SHIFT = (["shape=circle"], ["shape=square"], ["red", "small"])
"""Shifted probes: trained on samples with a circle, tested on samples with a square, for these labels."""
HELD_OUT = {"stars": "shape=star", "purple": "colour=purple"}
"""The OOD sets: a shape and a colour that the OOD runs' SAEs never saw (they train on half the samples, one
seed, the probed layers: what OOD scoring needs, in less of the demo's time)."""
PROBE_LAYERS = 4
"""Layers probed per run, evenly spaced, the last included (probes are the demo's slowest part)."""


def _recorded(cfg: DemoConfig, root: Path, source: str, runname: str, **samples) -> Run:
    """record.py of `source` over other shapes samples, reused when already there."""
    args = RecordArgs(root=str(root), run=source, runname=runname, device=cfg.device, overwrite=True, **samples)
    return record.recorded_run(args) or record.record(args)


def sae_probes(cfg: DemoConfig, runs: dict[str, Run], root: Path) -> SaeProbes:
    """The probes (docs/design.md#probes) on effnet and minilm: probes in distribution and shifted, OOD detection
    of held-out shapes and colours, ontology coverage."""
    n_test = max(100, cfg.max_samples // 4)
    ood_offset = 10 * cfg.max_samples  # past the samples the OOD runs scanned (they skip ~40%)
    out = SaeProbes({}, {}, {}, {})
    for name in (IMAGE, TEXT):
        run = runs[name]
        layers = sorted({run.layers[i] for i in np.linspace(0, len(run.layers) - 1, PROBE_LAYERS).round().astype(int)})
        test = _recorded(cfg, root, name, f"{name}_test", offset=cfg.max_samples, max_samples=n_test)
        args = ProbeArgs(root=str(root), run=name, device=cfg.device, layers=layers)
        out.probes[name] = probe(run, test, PROBE_LABELS, args)
        train_where, test_where, labels = SHIFT
        out.shifted[name] = probe(run, test, labels, dataclasses.replace(args, train_where=train_where,
                                                                         test_where=test_where))
        tree, holds_NH = load_hierarchy(None, run, None)
        out.ontology[name] = ontology(run, run.permuted(), tree, holds_NH,
                                      OntologyArgs(root=str(root), run=name, device=cfg.device, layers=layers))
        fit, _ = _train_or_reuse(cfg, name, root, runname=f"{name}_ood", layers=layers, seeds=cfg.seeds[:1],
                                 max_samples=max(20, cfg.max_samples // 2), exclude=list(HELD_OUT.values()))
        id_set = _recorded(cfg, root, fit.name, f"{name}_ood_id", offset=ood_offset, max_samples=n_test,
                           exclude=list(HELD_OUT.values()))
        out.ood[name] = [ood(fit, id_set, _recorded(cfg, root, fit.name, f"{name}_ood_{what}", offset=ood_offset,
                                                    max_samples=n_test // 2, where=[spec]), KNN_K,
                             resolve_device(cfg.device))[0]
                         for what, spec in HELD_OUT.items()]
    return out


def feature_attributes(run: Run, features: list[int], names: list[str],
                       attrs_NA: np.ndarray) -> list[tuple[str, float]]:
    """Best-correlated ground-truth attribute (name, Pearson r) of each given feature of the run's last layer."""
    f_NK = np.concatenate([codes[:, features].double().numpy() for _, codes in run.iter_codes(-1, "relu")])
    r_KA = labels.column_correlation(f_NK, attrs_NA).T
    return [(names[a], float(r_KA[k, a])) for k, a in enumerate(r_KA.argmax(1))]


def run_demo(cfg: DemoConfig) -> DemoResults:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    root = out / "sae_features"
    out.mkdir(parents=True, exist_ok=True)
    runs, seconds = {}, {}
    for name in RUNS:
        runs[name], seconds[name] = _train_or_reuse(cfg, name, root)
        warn_run(runs[name])

    opts = EngineOptions(root=str(root), codes="relu", device=cfg.device)
    engine = Correlator(opts, progress=tqdm_progress("correlations"))
    with_ci = Correlator(opts, progress=tqdm_progress("correlations (jackknife)"), jackknife=True)
    pairs = {f"{a}->{b}": w for (a, b), w in pair_scores(list(runs.values()), with_ci, True).items()}
    sims = SimilarityEngine(device=opts.torch_device)
    similarities = {f"{a}->{b}": sims.compare(runs[a], runs[b]) for a in runs for b in runs if a != b}
    _plots(pairs, list(runs), out)
    calibration_figure(pairs, similarities, out / "calibration.png")
    # the headline and the shared features read only layers whose SAEs fit the recorded token
    # (a run none of whose layers fits is read whole: there is nothing better to read)
    fit = {n: r.with_layers(fitting_layers(r) or r.layers) for n, r in runs.items()}
    left_out = {n: [layer for layer in r.layers if layer not in fit[n].layers] for n, r in runs.items()}
    headline = {f"{IMAGE}->{b}": wmppc(fit[IMAGE], fit[b], with_ci) for b in (TEXT, NULL)}
    sharedness = comp_sharedness(fit[IMAGE], [fit[TEXT]], [fit[NULL]], engine)
    shared = top_features(sharedness, cfg.top)
    shared.save(out / "comp_sharedness.json")
    gallery = sharedness_gallery(shared, GalleryOptions(root=str(root), out=str(out / "imgs" / "shared"),
                                                        overwrite=True, device=cfg.device, labels=True,
                                                        heatmaps=True))
    probes = sae_probes(cfg, runs, root) if cfg.probes else None
    joints = (headline_joints(fit[IMAGE], [fit[TEXT], fit[NULL]], JOINT, opts.torch_device) if cfg.joint else {})
    results = DemoResults(
        config=dataclasses.asdict(cfg), runs={n: r.meta for n, r in runs.items()}, train_seconds=seconds,
        wmppc=pairs, similarity=similarities, sharedness=shared, attributes=_attributes(runs, shared.features),
        poor_fits=[f"{r.with_seed(s).name} layer {layer}: fvu_pooled {fvu:.2f}" for r in runs.values()
                   for s in r.meta.sae.seeds for layer, fvu in poor_fits(r.with_seed(s))],
        gallery=str(gallery.index.relative_to(out.resolve())),
        grids=[str(gallery.grids[IMAGE, f.feature].relative_to(out.resolve())) for f in shared.features],
        seconds=time.perf_counter() - t0, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        probes=probes, headline=headline, left_out={n: v for n, v in left_out.items() if v},
        labels=_label_checks(fit, sharedness, shared, cfg), joint=joints)
    results.save(out / "results.json")
    demo_report.write(results, out)
    return results


def _plots(pairs: dict, names: list[str], out: Path) -> None:
    for b in (TEXT, NULL):
        res = pairs[f"{IMAGE}->{b}"]
        plot_heatmap(res.layer_matrix, [str(x) for x in res.source_layers], [str(x) for x in res.target_layers],
                     f"{IMAGE} layer", f"{b} layer", f"wMPPC {IMAGE} -> {b}", out / f"wmppc_{IMAGE}_{b}.png")
    table = np.array([[pairs[f"{a}->{b}"].all_layers if a != b else np.nan for b in names] for a in names])
    plot_heatmap(table, names, names, "source", "target", "wMPPC, all layers", out / "wmppc_runs.png")


def _attributes(runs: dict[str, Run], feats) -> list[AttributeMatch]:
    """The ground-truth attribute best correlated with each shared feature and with its text match."""
    attr_names, attrs_NA = data.attribute_matrix(data.from_description(runs[IMAGE].meta.dataset))
    own = feature_attributes(runs[IMAGE], [f.feature for f in feats], attr_names, attrs_NA)
    matched = feature_attributes(runs[TEXT], [f.match[TEXT] for f in feats], attr_names, attrs_NA)
    return [AttributeMatch(f.feature, a, r, ma, mr) for f, (a, r), (ma, mr) in zip(feats, own, matched)]


TOP_LABELLED = 64
"""The image model's features (by activation mass) whose labels are checked against ground truth."""


def _label_checks(fit: dict[str, Run], sharedness, shared, cfg: DemoConfig) -> DemoLabels:
    """Labels (labels.py) of the three runs' last fitting layers: how often the top shared features' matches
    carry their labels, and whether the image model's top features are named by the attribute they track."""
    device = resolve_device(cfg.device)
    named = {n: labels.named(r, r.layers[-1], device=device).features for n, r in fit.items()}
    top = {f.feature: named[IMAGE][f.feature] for f in shared.features if f.feature in named[IMAGE]}
    agree = {n: labels.agreement(top, named[n], sharedness.match[n]) for n in (TEXT, NULL)}
    image = fit[IMAGE]
    mass_F = np.concatenate([c.sum(0, keepdim=True).double().numpy() for _, c in image.iter_codes(-1, "relu")]).sum(0)
    feats = [int(f) for f in np.argsort(-mass_F, kind="stable")[:TOP_LABELLED]]
    attr_names, attrs_NA = data.attribute_matrix(data.from_description(image.meta.dataset))
    truth = [labels.label_words(a) for a, _ in feature_attributes(image, feats, attr_names, attrs_NA)]
    said = [labels.label_words(named[IMAGE][f].label) if f in named[IMAGE] else frozenset() for f in feats]
    rng = np.random.default_rng(0)
    floor = np.mean([np.mean([said[i] == truth[j] for i, j in enumerate(rng.permutation(len(feats)))])
                     for _ in range(labels.AGREEMENT_SHUFFLES)])
    return DemoLabels(agree, len(feats), float(np.mean([s == t for s, t in zip(said, truth)])), float(floor))


def follow_up(cfg: DemoConfig) -> list[str]:
    """The commands that explore the demo's runs further: they live under <out>/sae_features, not in the
    commands' default --root."""
    out = Path(cfg.out)
    root = shlex.quote(str(out / "sae_features"))
    lines = [f"uv run show.py --run {IMAGE} --root {root} --out {shlex.quote(str(out / 'imgs' / IMAGE))}",
             f"uv run wmppc.py --source {IMAGE} --target {TEXT} --ci --calibrate --root {root}",
             f"uv run comp_sharedness.py --source {IMAGE} --min_group {TEXT} --max_group {NULL} --root {root}",
             f"uv run similarity.py --runs {IMAGE} {TEXT} {NULL} --root {root}"]
    if cfg.joint:
        lines.append(f"uv run joint.py --runs {IMAGE} {TEXT} --expansion_factor {SMALL['expansion_factor']} "
                     f"--top_k {SMALL['top_k']} --root {root}")
    if cfg.probes:
        lines += [f"uv run probe.py --run {IMAGE} --test_run {IMAGE}_test --root {root}",
                  f"uv run ood.py --id {IMAGE}_ood_id --ood {IMAGE}_ood_stars --root {root}"]
    return lines


@cli
def main(argv=None):
    cfg = parse(DemoConfig, argv, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    res = run_demo(cfg)
    print(demo_report.summary(res, Path(cfg.out)))
    print("explore further:\n" + "".join(f"  {line}\n" for line in follow_up(cfg)), end="")


if __name__ == "__main__":
    main()
