"""Linear probes of a run's layers (docs/design.md#probes, after Olson et al., arXiv 2508.11277): does a layer's SAE
code carry a label linearly, compared with the raw pooled activations and with random features of the
SAE's width?

    uv run probe.py --run effnet --test_run effnet_test --labels red circle small
    uv run probe.py --run effnet --labels red --train_where shape=circle --test_where shape=square   # shift

For every layer and label: scikit-learn logistic regression (standardised inputs, balanced classes) on
(a) the SAE's codes (`--codes relu|topk`), (b) the raw pooled activations, (c) ReLU of a Gaussian random
projection of the raw activations to the SAE's width; and sparse probes on the `--top_n` features (SAE)
or neurons (raw) with the largest univariate AUROC distance from 0.5 on the training samples. Balanced
accuracy and AUROC on the test samples: another run recorded with record.py (held-out samples the SAEs
never saw), or else a seeded `--test_fraction` of the run's own samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

import data
from data.shapes import filter_attribute
from errors import UserError, check_positive, cli
from saeshare.core.options import OutputOptions, parse
from saeshare.core.progress import progress
from saeshare.disk.results import PROBE_KINDS, ProbeResults
from saeshare.disk.runs import Run, check_recorded_from
from saeshare.engine.options import AnalysisOptions
from saeshare.render.figures import format_layer_table, pyplot, save


def run_labels(run: Run, names: list[str] | None, column: str | None = None,
               strict: bool = True) -> tuple[list[str], np.ndarray]:
    """(names, labels_NL) of the run's samples: shapes attributes or the classes of a label column (all of
    them when `names` is None). Unknown names are an error when `strict`, else all-False columns (a class
    that a test set happens to lack)."""
    all_names, labels_NA = data.label_matrix(data.from_description(run.meta.dataset), column)
    names = all_names if names is None else names
    unknown = [n for n in names if n not in all_names]
    if unknown and strict:
        what = f"the classes of column {column!r}" if column else "shapes labels"
        listed = ", ".join(all_names[:40]) + (", ..." if len(all_names) > 40 else "")
        raise UserError(f"unknown label {', '.join(map(repr, unknown))}: {what} are {listed}")
    col = {n: k for k, n in enumerate(all_names)}
    out = np.zeros((run.n_samples, len(names)), dtype=bool)
    for j, n in enumerate(names):
        if n in col:
            out[:, j] = labels_NA[:, col[n]]
    return names, out


def _mask(run: Run, specs: list[str]) -> np.ndarray:
    """[N] the samples having every KEY=VALUE attribute of `specs` (shapes)."""
    names = [filter_attribute(s) for s in specs]
    return run_labels(run, names)[1].all(1) if names else np.ones(run.n_samples, dtype=bool)


def _fit_score(x_train, y_train, x_test, y_test) -> tuple[float, float]:
    """(balanced accuracy, AUROC) of a logistic probe; NaN where a split has a single class."""
    if len(set(y_train)) < 2 or len(set(y_test)) < 2:
        return float("nan"), float("nan")
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, class_weight="balanced").fit(scaler.transform(x_train), y_train)
    x = scaler.transform(x_test)
    return balanced_accuracy_score(y_test, clf.predict(x)), roc_auc_score(y_test, clf.decision_function(x))


def column_auroc(x_NF: np.ndarray, y_NL: np.ndarray, block: int = 1024) -> np.ndarray:
    """[L, F] AUROC of every column of x as a score for every label of y, ties counting one half (as
    roc_auc_score): the Mann-Whitney U from scipy's average ranks, all pairs in one product per block of
    columns. NaN for a label that is all True or all False."""
    y = np.asarray(y_NL, dtype=np.float64)
    n1 = y.sum(0)
    n0 = len(y) - n1
    out = np.empty((y.shape[1], x_NF.shape[1]))
    for start in range(0, x_NF.shape[1], block):
        ranks = rankdata(x_NF[:, start:start + block], axis=0)
        out[:, start:start + block] = y.T @ ranks - (n1 * (n1 + 1) / 2)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return out / (n1 * n0)[:, None]


def _top(x_train: np.ndarray, y_train_NL: np.ndarray, n: int) -> np.ndarray:
    """[labels, n]: per label, the n columns whose values alone separate the classes best (|AUROC - 0.5| on
    the training samples)."""
    score = np.nan_to_num(np.abs(column_auroc(x_train, y_train_NL) - 0.5))
    return np.argsort(-score, axis=1, kind="stable")[:, :n]


def _features(run: Run, layer: int, codes: str, rows: np.ndarray, rng_seed: int, device) -> dict[str, np.ndarray]:
    raw = run.read_acts(layer, rows).numpy()
    sae = run.dense_codes(layer, codes, rows, device).cpu().numpy()
    proj = np.random.default_rng(rng_seed).normal(size=(raw.shape[1], sae.shape[1])) / np.sqrt(raw.shape[1])
    return {"sae": sae, "raw": raw, "random": np.maximum(raw @ proj, 0)}


def probe(run: Run, test: Run | None, labels: list[str] | None, opts: "ProbeArgs") -> ProbeResults:
    labels, y = run_labels(run, labels, opts.label_column)
    train_rows = np.flatnonzero(_mask(run, opts.train_where))
    if test is None:
        held = np.random.default_rng(opts.seed).random(run.n_samples) < opts.test_fraction
        test_rows, train_rows = np.flatnonzero(held & _mask(run, opts.test_where)), train_rows[~held[train_rows]]
        y_test_all = y
    else:
        test_rows = np.flatnonzero(_mask(test, opts.test_where))
        y_test_all = run_labels(test, labels, opts.label_column, strict=False)[1]
    if len(train_rows) == 0 or len(test_rows) == 0:
        raise UserError("no training or no test sample left after --train_where / --test_where / --test_fraction")
    layers = [run.resolve_layer(layer) for layer in opts.layers] if opts.layers else run.layers
    acc = {k: np.full((len(layers), len(labels)), np.nan) for k in PROBE_KINDS}
    auc = {k: np.full((len(layers), len(labels)), np.nan) for k in PROBE_KINDS}
    for i, layer in enumerate(progress(layers, desc=f"probes of {run.name}", unit="layer")):
        tr = _features(run, layer, opts.codes or "relu", train_rows, opts.seed + layer, opts.torch_device)
        te = _features(test or run, layer, opts.codes or "relu", test_rows, opts.seed + layer, opts.torch_device)
        y_tr, y_te = y[train_rows], y_test_all[test_rows]
        top = {base: _top(tr[base], y_tr, opts.top_n) for base in ("sae", "raw")}
        for j in range(len(labels)):
            for kind in ("sae", "raw", "random"):
                acc[kind][i, j], auc[kind][i, j] = _fit_score(tr[kind], y_tr[:, j], te[kind], y_te[:, j])
            for base in ("sae", "raw"):
                cols = top[base][j]
                acc[f"{base}_top"][i, j], auc[f"{base}_top"][i, j] = _fit_score(
                    tr[base][:, cols], y_tr[:, j], te[base][:, cols], y_te[:, j])
    return ProbeResults(run.name, test.name if test else f"{run.name} (held out)", opts.codes or "relu", opts.top_n,
                        layers, labels, acc, auc, list(opts.train_where), list(opts.test_where), opts.label_column)


@dataclass(kw_only=True)
class ProbeArgs(OutputOptions, AnalysisOptions):
    run: str
    """The run the probes are trained on."""
    test_run: str | None = None
    """Test on this run (held-out samples recorded with record.py from --run); default: a held-out split."""
    labels: list[str] | None = None
    """shapes labels (attribute names: red, circle, small, center, bg:blue, "red circle", ...; default:
    every colour, shape and size), or classes of --label_column (default: all)."""
    label_column: str | None = None
    """Hub or local datasets: the column whose values are the labels (one-vs-rest per class)."""
    train_where: list[str] = field(default_factory=list)
    """Train on the samples with these KEY=VALUE attributes only (a shift, with --test_where)."""
    test_where: list[str] = field(default_factory=list)
    """Test on the samples with these KEY=VALUE attributes only."""
    test_fraction: float = 0.25
    """Without --test_run: the share of the run's samples held out for testing (seeded)."""
    top_n: int = 16
    """Features (or neurons) of the sparse probes."""
    layers: list[int] | None = None
    """Layers to probe (default: all of the run's)."""
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_positive("top_n", self.top_n)
        if not 0 < self.test_fraction < 1:
            raise UserError(f"--test_fraction must be in (0, 1), got {self.test_fraction}")


def _plot(res: ProbeResults, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind in PROBE_KINDS:
        ax.plot(res.layers, np.nanmean(res.balanced_accuracy[kind], axis=1), marker="o", label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("balanced accuracy (mean over labels)")
    ax.set_title(f"probes of {res.run}, tested on {res.test}")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    save(fig, path, 130)


@cli
def main(argv=None):
    args = parse(ProbeArgs, argv, "Linear probes of SAE features, raw activations and random features")
    run = Run.open(args.root, args.run)
    test = Run.open(args.root, args.test_run) if args.test_run else None
    if test is not None:
        check_recorded_from(test, run, "--test_run")
    labels = args.labels
    if labels is None and args.label_column is None:
        labels = [*data.shapes.COLOURS, *data.shapes.SHAPES, *data.shapes.SIZES]
    res = probe(run, test, labels, args)
    title = f"balanced accuracy, mean over {len(res.labels)} labels (tested on {res.test}):"
    print(format_layer_table(title, res.layers, {k: np.nanmean(res.balanced_accuracy[k], axis=1) for k in PROBE_KINDS}))
    args.write(res, lambda path: _plot(res, path))


if __name__ == "__main__":
    main()
