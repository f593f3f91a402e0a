"""Joint dictionaries: one sparse dictionary trained on several runs' pooled activations at once, samples
paired by index, as a second opinion on wMPPC's one-by-one matching of separately trained SAEs.

    uv run joint.py --runs clip dino --method sparc            # last layers; --layers LA LB to choose
    uv run joint.py --runs clip bert --method crosscoder --json joint.json --plot joint.png

It prints, for the runs as given and for the floor (the same training with every run but the first read
through a permutation of its samples): the shared part of the dictionary, the Jaccard index of the latents
each run picks alone, the cross-reconstruction R^2 from each run's code to each other run, and the FVU of
each run. With --match (default) the first run's own SAE features are matched to the joint latents.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from errors import UserError, cli
from saeshare.core.options import OutputOptions, parse
from saeshare.disk.results import JointMatch, JointReport, JointScores
from saeshare.disk.runs import Run, open_runs
from saeshare.engine.options import AnalysisOptions
from saeshare.joint.dictionary import JointConfig, Trained, standardise, train_joint
from saeshare.joint.measures import CHUNK, JointMeasures, match, measure
from saeshare.render.figures import pyplot, save


@dataclass(kw_only=True)
class JointArgs(OutputOptions, AnalysisOptions, JointConfig):
    runs: list[str]
    """Two or more runs over the same samples."""
    layers: list[int] | None = None
    """One layer per run (default: each run's last; -1 = last)."""
    match: bool = True
    """Match the first run's own SAE features to the joint latents (--no_match to skip)."""

    def __post_init__(self):
        super().__post_init__()
        JointConfig.__post_init__(self)
        if len(self.runs) < 2 or len(set(self.runs)) != len(self.runs):
            raise UserError(f"--runs takes two or more distinct runs, got {' '.join(self.runs)}")
        if self.layers is not None and len(self.layers) != len(self.runs):
            raise UserError(f"--layers takes one layer per run: {len(self.runs)} runs, {len(self.layers)} layers")

    @property
    def config(self) -> JointConfig:
        return JointConfig(**{f: getattr(self, f) for f in JointConfig.__dataclass_fields__})


def _scores(m: JointMeasures, trained: Trained) -> JointScores:
    return JointScores(m.shared_fraction, m.private_fraction, m.shared_latents, m.private_latents, int(m.live_F.sum()),
                       m.jaccard_SS, m.cross_r2_SS, [float(v) for v in m.fvu_S], len(trained.loss_E),
                       trained.loss_E)


def _match(run: Run, layer: int, codes: str, model, xs: list[torch.Tensor], rows: np.ndarray, share: JointMeasures,
           device) -> JointMatch:
    """The run's features (stream 0) against the joint latents of its stream, by correlation over the measured
    samples `rows` (xs: those rows' standardised activations)."""
    mass_F = np.zeros(run.n_features(layer))
    starts = range(0, len(rows), CHUNK)

    def feature_chunks():
        for start in starts:
            c = run.dense_codes(layer, codes, rows[start:start + CHUNK], device)
            mass_F[:] += c.sum(0).double().cpu().numpy()
            yield c

    def latent_chunks():
        for start in starts:
            with torch.no_grad():
                got = model.encode([x[start:start + CHUNK].to(device) for x in xs])
            yield torch.zeros(len(got.idx_NK), model.n_latents, device=device).scatter_(1, got.idx_NK, got.vals_SNK[0])

    found = match(feature_chunks(), latent_chunks(), len(rows))
    total = float(mass_F.sum())
    if not total > 0:
        raise UserError(f"run {run.name!r} layer {layer}: its features are 0 on every measured sample")
    return JointMatch(float((mass_F * found.rho_F).sum() / total), float(mass_F[share.shared_F[found.latent_F]].sum()
                                                                         / total),
                      found.latent_F.tolist(), found.rho_F.tolist())


def joint_report(runs: list[Run], layers: list[int], cfg: JointConfig, device="cpu", codes: str = "relu",
                 with_match: bool = True) -> JointReport:
    """Train on the runs as they are and on the floor (runs after the first permuted), each on the training
    rows, and measure both on the held-out rows."""
    fit, measured = cfg.split(runs[0].n_samples)

    def stream(run: Run, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = standardise(run.read_acts(layer, slice(None)), fit).x_ND
        return x[fit], x[measured]

    names = ", ".join(f"{r.name}@{layer}" for r, layer in zip(runs, layers))
    first = stream(runs[0], layers[0])  # the same in the runs and their floor
    train_xs, test_xs = map(list, zip(first, *(stream(r, la) for r, la in zip(runs[1:], layers[1:]))))
    trained = train_joint(train_xs, cfg, device, desc=f"{cfg.method} {names}")
    del train_xs  # the floor's streams take their place
    got = measure(trained.model, test_xs, device)
    null_train, null_test = map(list, zip(first, *(stream(r.permuted(), la) for r, la in zip(runs[1:], layers[1:]))))
    null = train_joint(null_train, cfg, device, desc=f"{cfg.method} floor")
    del null_train
    floor = measure(null.model, null_test, device)
    matched = _match(runs[0], layers[0], codes, trained.model, test_xs, measured, got, device) if with_match else None
    return JointReport(**vars(_scores(got, trained)), runs=[r.name for r in runs], layers=layers,
                       method=cfg.method, n_latents=trained.model.n_latents, top_k=cfg.top_k,
                       n_samples=runs[0].n_samples, n_measured=len(measured), floor=_scores(floor, null),
                       match=matched, share=got.share_SF, floor_share=floor.share_SF)


SMALL = dict(expansion_factor=1, top_k=8)
"""The reports' joint dictionaries at a small size: 2,000 pooled rows (the demo's) would let the default
8 x d latents memorise pairings of training samples."""


def headline_joints(source: Run, others: list[Run], configs: list[JointConfig], device="cpu") -> dict[str, JointReport]:
    """The reports' joint section: every method of `configs` over the source and each of `others` (last layers),
    keyed "METHOD SOURCE->OTHER"."""
    return {f"{cfg.method} {source.name}->{other.name}": joint_report([source, other], [source.layers[-1],
                                                                                        other.layers[-1]], cfg, device)
            for cfg in configs for other in others}


def summary(rep: JointReport) -> list[str]:
    """The report's lines: each measure for the runs and their floor."""
    names, floor = rep.runs, rep.floor
    rows = [("shared fraction (weight)", rep.shared_fraction, floor.shared_fraction),
            ("shared latents (count)", rep.shared_latents, floor.shared_latents)]
    rows += [(f"private to {n} (weight)", rep.private_fraction[s], floor.private_fraction[s])
             for s, n in enumerate(names)]
    pairs = [(s, t) for s in range(len(names)) for t in range(len(names)) if s != t]
    rows += [(f"Jaccard {names[s]}-{names[t]}", rep.jaccard[s][t], floor.jaccard[s][t]) for s, t in pairs if s < t]
    rows += [(f"cross R2 {names[s]}->{names[t]}", rep.cross_r2[s][t], floor.cross_r2[s][t]) for s, t in pairs]
    rows += [(f"FVU {n}", rep.fvu[s], floor.fvu[s]) for s, n in enumerate(names)]
    width = max(len(r[0]) for r in rows)
    lines = [f"{rep.method} over {', '.join(f'{n} (layer {la})' for n, la in zip(names, rep.layers))}: "
             f"{rep.n_latents} latents, top-{rep.top_k}, {rep.live_latents} live; trained on "
             f"{rep.n_samples - rep.n_measured if rep.n_measured < rep.n_samples else rep.n_samples} samples, "
             f"measured on {rep.n_measured}; {rep.epochs} epochs (floor {floor.epochs})",
             f"{'':{width}}  {'runs':>8}  {'floor':>8}"]
    lines += [f"{label:{width}}  {value:8.3f}  {base:8.3f}" for label, value, base in rows]
    if rep.match is not None:
        lines.append(f"{names[0]}'s own SAE features against the joint latents: wMPPC {rep.match.wmppc:.3f}; "
                     f"{rep.match.shared_mass:.2f} of their activation mass on features whose best latent is shared")
    return lines


def plot(rep: JointReport, path: str) -> None:
    """Latents by their weight in the first run over the largest: two runs, the literature's relative norm
    |d_A| / (|d_A| + |d_B|); more runs, the smallest share. The floor's in grey."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for share, label, colour in ((rep.share, "runs", "C0"), (rep.floor_share, "floor (permuted)", "0.6")):
        share = np.asarray(share)
        live = share.max(0) > 0
        x = share[0, live] / share[:, live].sum(0) if len(share) == 2 else share[:, live].min(0)
        ax.hist(x, bins=40, range=(0, 1), alpha=0.6, color=colour, label=f"{label}: {int(live.sum())} live")
    ax.set_xlabel(f"relative norm, {rep.runs[0]} / ({' + '.join(rep.runs)})" if len(rep.runs) == 2
                  else "smallest share over the runs")
    ax.set_ylabel("latents")
    ax.set_title(f"{rep.method}: shared {rep.shared_fraction:.2f} of the weight "
                 f"(floor {rep.floor.shared_fraction:.2f})")
    ax.legend()
    save(fig, path)


@cli
def main(argv=None):
    args = parse(JointArgs, argv, "Train a joint dictionary (SPARC or crosscoder) over several runs, with a floor")
    runs = open_runs(args.root, args.runs, verbose=args.verbose)
    layers = [r.resolve_layer(la) for r, la in zip(runs, args.layers or [-1] * len(runs))]
    rep = joint_report(runs, layers, args.config, args.torch_device, args.codes or "relu", args.match)
    print("\n".join(summary(rep)))
    args.write(rep, lambda path: plot(rep, path))
    return rep


if __name__ == "__main__":
    main()
