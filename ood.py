"""Out-of-distribution detection from SAE features (docs/design.md#probes, after Olson et al., arXiv 2508.11277).

    uv run record.py --run effnet --offset 2000 --max_samples 500 --exclude shape=star --runname id_test
    uv run record.py --run effnet --where shape=star --max_samples 500 --runname ood_stars
    uv run ood.py --id id_test --ood ood_stars --json ood.json --plot ood.png

Both sets must be recorded from one run (record.py), whose own samples fit the scores. Scores, higher
meaning "more out of distribution", per layer: from the SAE, `recon_error` (squared reconstruction error
of the top-k SAE), `low_energy` (minus the sum of the ReLU codes), `low_max` (minus the largest code),
`knn_codes` (cosine distance to the k-th nearest fit sample in code space); raw baselines on the pooled
activations, `mahalanobis` (scikit-learn's empirical covariance of the fit samples) and `knn_raw`.
Metrics (scikit-learn): AUROC, FPR at 95% TPR (the share of OOD samples accepted when 95% of
in-distribution samples are), AUPR-in and AUPR-out. An AUROC well below 0.5 is a score that separates
the sets the other way round (an OOD set with more feature energy than the fitted data, say).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy import sparse
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from sklearn.neighbors import NearestNeighbors

from errors import UserError, check_positive, cli
from saeshare.core.options import OutputOptions, parse
from saeshare.core.progress import progress
from saeshare.disk.results import OOD_METRICS, OOD_SCORES, OodResults
from saeshare.disk.runs import Run, StreamOptions, check_recorded_from
from saeshare.render.figures import format_layer_table, pyplot, save

KNN_K = 10
"""Neighbours of the kNN scores by default."""


class Detection(NamedTuple):
    auroc: float
    fpr95: float
    """Share of OOD samples scored below the threshold that keeps 95% of in-distribution samples."""
    aupr_in: float
    aupr_out: float


def detection(score_id: np.ndarray, score_ood: np.ndarray) -> Detection:
    """Metrics of a score where higher means more out of distribution."""
    y_ood = np.r_[np.zeros(len(score_id)), np.ones(len(score_ood))]
    score = np.r_[score_id, score_ood]
    fpr, tpr, _ = roc_curve(1 - y_ood, -score, drop_intermediate=False)  # in-distribution as the positive class
    return Detection(roc_auc_score(y_ood, score), float(fpr[np.searchsorted(tpr, 0.95)]),
                     average_precision_score(1 - y_ood, -score), average_precision_score(y_ood, score))


def _knn_distance(fit, query, k: int, same: bool) -> np.ndarray:
    """Cosine distance to the k-th nearest fit sample (itself left out when `query` is `fit`); dense arrays
    or sparse matrices."""
    nn = NearestNeighbors(n_neighbors=k + same, metric="cosine").fit(fit)
    return nn.kneighbors(query)[0][:, -1]


class SaeScores(NamedTuple):
    recon_error: np.ndarray
    energy: np.ndarray
    max_code: np.ndarray
    codes: sparse.csr_matrix
    """[N, F] the top-k codes, k entries a row: memory N k, not N F."""


@torch.no_grad()
def sae_scores(run: Run, layer: int, sae, chunk_size: int, device) -> SaeScores:
    """The SAE's view of a run's samples, chunk by chunk."""
    parts = []
    for start in range(0, run.n_samples, chunk_size):
        x = run.read_acts(layer, slice(start, start + chunk_size), device)
        pre = sae.pre_acts(x)
        top = sae.encode(x)
        parts.append(((x - sae.decode(*top)).square().sum(1).cpu().numpy(), pre.sum(1).cpu().numpy(),
                      pre.max(1).values.cpu().numpy(), top.top_acts.cpu().numpy(), top.top_indices.cpu().numpy()))
    recon, energy, max_code, vals, idx = (np.concatenate(p) for p in zip(*parts))
    n, k = idx.shape
    codes = sparse.csr_matrix((vals.ravel(), idx.ravel(), np.arange(0, n * k + 1, k)), shape=(n, sae.n_features))
    return SaeScores(recon, energy, max_code, codes)


def layer_scores(fit: Run, runs: list[Run], layer: int, k: int, device,
                 chunk_size: int = 4096) -> list[dict[str, np.ndarray]]:
    """Every score of every run's samples at one layer, fitted on `fit`'s samples."""
    sae = fit.sae(layer, device)
    raw_fit = fit.read_acts(layer, slice(None)).numpy()
    codes_fit = sae_scores(fit, layer, sae, chunk_size, device).codes
    cov = EmpiricalCovariance().fit(raw_fit)
    out = []
    for run in runs:
        got = sae_scores(run, layer, sae, chunk_size, device)
        raw = run.read_acts(layer, slice(None)).numpy()
        out.append({"recon_error": got.recon_error, "low_energy": -got.energy, "low_max": -got.max_code,
                    "knn_codes": _knn_distance(codes_fit, got.codes, k, run is fit),
                    "mahalanobis": cov.mahalanobis(raw), "knn_raw": _knn_distance(raw_fit, raw, k, run is fit)})
    return out


@dataclass(kw_only=True)
class OodArgs(OutputOptions, StreamOptions):
    id: str
    """In-distribution test samples: a run recorded with record.py from the fitted run."""
    ood: str
    """Out-of-distribution samples, recorded from the same run."""
    k: int = KNN_K
    """Neighbours of the kNN scores."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("k", self.k)


def _fit_run(root: str, id_run: Run, ood_run: Run) -> Run:
    """The run both sets were recorded from (its own samples fit the scores)."""
    sources = {id_run.meta.sae_from, ood_run.meta.sae_from}
    if None in sources or len(sources) != 1:
        raise UserError(f"--id {id_run.name!r} and --ood {ood_run.name!r} must both be recorded (record.py) from "
                        f"the same run; they come from {id_run.meta.sae_from!r} and {ood_run.meta.sae_from!r}")
    fit = Run.open(root, sources.pop())
    check_recorded_from(id_run, fit, "--id")
    check_recorded_from(ood_run, fit, "--ood")
    return fit


def ood(fit: Run, id_run: Run, ood_run: Run, k: int, device, chunk_size: int = 4096) -> tuple[OodResults, list[dict]]:
    if fit.n_samples <= k or id_run.n_samples < 2 or ood_run.n_samples < 2:
        raise UserError(f"too few samples: the fitted run needs more than --k {k}, each set at least 2")
    metrics = {s: {m: [] for m in OOD_METRICS} for s in OOD_SCORES}
    curves = []
    for layer in progress(fit.layers, desc="OOD scores", unit="layer"):
        s_id, s_ood = layer_scores(fit, [id_run, ood_run], layer, k, device, chunk_size)
        curves.append((s_id, s_ood))
        for s in OOD_SCORES:
            for m, v in zip(OOD_METRICS, detection(s_id[s], s_ood[s])):
                metrics[s][m].append(float(v))
    return OodResults(fit.name, id_run.name, ood_run.name, fit.layers, metrics), curves


def _plot(res: OodResults, curves: list, path: str) -> None:
    plt = pyplot()
    cols = min(4, len(res.layers))
    rows = -(-len(res.layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
    for ax, layer, (s_id, s_ood) in zip(axes.flat, res.layers, curves):
        for s in OOD_SCORES:
            fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(s_id[s])), np.ones(len(s_ood[s]))], np.r_[s_id[s], s_ood[s]])
            ax.plot(fpr, tpr, lw=1, label=s)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
        ax.set_title(f"layer {layer}", fontsize=9)
    axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[len(res.layers):]:
        ax.axis("off")
    fig.suptitle(f"OOD: {res.ood} against {res.id} (fit on {res.fit})")
    save(fig, path, 110)


@cli
def main(argv=None):
    args = parse(OodArgs, argv, "OOD detection from SAE features against raw baselines")
    id_run, ood_run = Run.open(args.root, args.id), Run.open(args.root, args.ood)
    fit = _fit_run(args.root, id_run, ood_run)
    res, curves = ood(fit, id_run, ood_run, args.k, args.torch_device, args.chunk_size)
    print(format_layer_table(f"AUROC per layer, {res.ood} against {res.id} (fit on {res.fit}):", res.layers,
                             {s: res.metrics[s]["auroc"] for s in OOD_SCORES}))
    args.write(res, lambda path: _plot(res, curves, path))


if __name__ == "__main__":
    main()
