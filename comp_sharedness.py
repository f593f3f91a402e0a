"""Comparative Sharedness (docs/design.md#comparative-sharedness): the features of a model M shared with every
model of a group G and poorly with every model of a group H, last layer of each run.

    Delta_i = S_i^M * ((min_{g in G} rho_i^{M->g})^2 - (max_{h in H} rho_i^{M->h})^2)

    uv run comp_sharedness.py --source M --min_group G1 G2 --max_group H1 H2 [--top N] [--json out.json]

Both groups must be non-empty (docs/design.md#bad-input): with H empty the score is just "shared with G", which
`wmppc.py`'s correlations already answer; an empty G would make every feature "shared".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

import labels
from errors import UserError, check_at_least, cli
from saeshare.core import distributed
from saeshare.core.options import check_output, parse
from saeshare.disk.results import LabelAgreement, SharedFeature, SharednessReport
from saeshare.disk.runs import PERMUTED, Run, open_runs, run_warnings
from saeshare.engine.correlator import Correlator, tqdm_progress
from saeshare.engine.options import EngineOptions


class Sharedness(NamedTuple):
    source: str
    min_group: list[str]
    max_group: list[str]
    codes: str
    layers: dict[str, int]
    """The (last) layer used for each run, source included."""
    delta_F: np.ndarray
    mass_F: np.ndarray
    rho: dict[str, np.ndarray]
    """run -> [F] rho_i^{M->run}."""
    match: dict[str, np.ndarray]
    """run -> [F] best-matching feature of run."""


def check_groups(source: str, min_group: list[str], max_group: list[str]) -> None:
    for flag, group in (("--min_group", min_group), ("--max_group", max_group)):
        if not group:
            raise UserError(f"{flag} is empty: give at least one run")
        if source in group:
            raise UserError(f"the source {source!r} is listed in its own {flag}")
        if len(set(group)) != len(group):
            raise UserError(f"{flag} lists a run twice: {' '.join(group)}")
    both = sorted(set(min_group) & set(max_group))
    if both:
        raise UserError(f"{', '.join(both)} in both --min_group and --max_group")


def comp_sharedness(source: Run, min_group: list[Run], max_group: list[Run], engine: Correlator) -> Sharedness:
    check_groups(source.name, [r.name for r in min_group], [r.name for r in max_group])
    a = source.layers[-1]
    stats = {r.name: engine.pair_stats(source, r, [(a, r.layers[-1])])[a, r.layers[-1]] for r in min_group + max_group}
    mass_F = stats[min_group[0].name].mass_F
    # a true minimum over G (the paper's code starts it at 0, which cancels the G term)
    g_min_F = np.min([stats[r.name].rho_F for r in min_group], axis=0)
    h_max_F = np.max([stats[r.name].rho_F for r in max_group], axis=0)
    return Sharedness(source.name, [r.name for r in min_group], [r.name for r in max_group], engine.codes,
                      {r.name: r.layers[-1] for r in [source, *min_group, *max_group]},
                      mass_F * (g_min_F ** 2 - h_max_F ** 2), mass_F,
                      {n: s.rho_F for n, s in stats.items()}, {n: s.match_F for n, s in stats.items()})


def top_features(res: Sharedness, top: int | None = None) -> SharednessReport:
    """The `top` features by Delta (default: 1% of the features, at least one), best first."""
    if top is None:
        top = max(1, math.ceil(len(res.delta_F) / 100))
    order = np.argsort(-res.delta_F, kind="stable")[:top]
    feats = [SharedFeature(int(i), float(res.delta_F[i]), {n: float(r[i]) for n, r in res.rho.items()},
                           {n: int(m[i]) for n, m in res.match.items()}, float(res.mass_F[i]))
             for i in order]
    return SharednessReport(res.source, res.min_group, res.max_group, feats, res.codes, res.layers)


def label_agreement(source: Run, others: list[Run], res: Sharedness, report: SharednessReport,
                    opts: EngineOptions) -> dict[str, LabelAgreement]:
    """For M's top features: per run of G and H, how often its best match carries the same label."""
    def named(run: Run) -> dict:
        return labels.named(run, res.layers[run.name], res.codes, opts.torch_device).features

    mine = named(source)
    top = {f.feature: mine[f.feature] for f in report.features if f.feature in mine}
    return {r.name: labels.agreement(top, named(r), res.match[r.name]) for r in others}


def format_agreement(agree: dict[str, LabelAgreement], n_top: int) -> str:
    return "\n".join(f"labels of the top {n_top} features, {name}: {a.share:.3f} of {a.n_pairs} labelled matches "
                     f"agree; with the matches shuffled {a.floor:.3f}" for name, a in agree.items())


def format_features(res: Sharedness, feats: list[SharedFeature]) -> str:
    runs = [*res.min_group, *res.max_group]
    width = max(15, *(len(n) + 4 for n in runs))
    head = (f"Comparative Sharedness of {res.source!r} (layer {res.layers[res.source]}, {len(res.delta_F)} features, "
            f"{res.codes} codes): top {len(feats)} by Delta\n"
            f"min over {', '.join(f'{n} (layer {res.layers[n]})' for n in res.min_group)}; "
            f"max over {', '.join(f'{n} (layer {res.layers[n]})' for n in res.max_group)}\n"
            f"cells: rho (best-matching feature)\n")
    names = [("min " if n in res.min_group else "max ") + n for n in runs]
    lines = [f"{'feature':>8} {'delta':>11} {'mass':>11} |" + "".join(" " + n.rjust(width) for n in names)]
    for f in feats:
        cells = "".join(" " + f"{f.rho[n]:+.3f} ({f.match[n]})".rjust(width) for n in runs)
        lines.append(f"{f.feature:>8} {f.delta:>11.4g} {f.mass:>11.4g} |{cells}")
    return head + "\n".join(lines)


@dataclass
class SharednessArgs(EngineOptions):
    source: str | None = None
    """Run M whose features are ranked."""
    min_group: list[str] = field(default_factory=list)
    """Runs G: a feature must be shared with all of them."""
    max_group: list[str] = field(default_factory=list)
    """Runs H: a feature must be shared with none of them."""
    top: int | None = None
    """Number of features shown (default: 1% of the features)."""
    json: str | None = None
    """Write the top features to this JSON file (show.py --from_json reads it)."""
    labels: bool = False
    """Also say how often each run's best match of a top feature carries the feature's label (labels.py),
    against the same share with the matches shuffled."""

    def __post_init__(self):
        super().__post_init__()
        if not self.source:
            raise UserError("--source is required: the run whose features are ranked")
        check_groups(self.source, self.min_group, self.max_group)
        check_at_least("top", self.top, 1)
        check_output(self.json, "--json")


@cli
def main(argv=None):
    args = parse(SharednessArgs, argv, "Comparative Sharedness of the features of one run")
    distributed.init(args.torch_device)
    engine = Correlator(args, progress=tqdm_progress("correlations"))
    source, *others = open_runs(args.root, [args.source, *args.min_group, *args.max_group], verbose=args.verbose)
    others = [r.permuted() for r in others] if args.null == "permute" else others
    res = comp_sharedness(source, others[:len(args.min_group)], others[len(args.min_group):], engine)
    report = top_features(res, args.top)
    print(format_features(res, report.features))
    if args.labels:
        report.label_agreement = label_agreement(source, others, res, report, args)
        print(format_agreement(report.label_agreement, len(report.features)))
    if args.json:
        report = dataclasses.replace(report, warnings=[w for r in [source, *others] for w in run_warnings(r)])
        (_plain_names(report) if args.null == "permute" else report).save(args.json)


def _plain_names(report: SharednessReport) -> SharednessReport:
    """A null's report under the runs' own names, marked `null`: show.py --from_json finds the runs."""
    plain = lambda name: name.removesuffix(PERMUTED)  # noqa: E731
    feats = [dataclasses.replace(f, rho={plain(k): v for k, v in f.rho.items()},
                                 match={plain(k): v for k, v in f.match.items()}) for f in report.features]
    return dataclasses.replace(report, min_group=list(map(plain, report.min_group)),
                               max_group=list(map(plain, report.max_group)), features=feats, null=True,
                               layers=None if report.layers is None
                               else {plain(k): v for k, v in report.layers.items()})


if __name__ == "__main__":
    main()
