"""Name features from what their samples say: for every feature of one layer, the caption term (word or
two-word phrase, English stop words out) or ground-truth label (shapes attributes, or the classes of a
label column) whose presence its activation predicts best, by AUROC over all samples.

    uv run labels.py --run effnet --json labels.json           # the run's last layer
    uv run labels.py --run clip --layer 10 --label_column label

The floor is the same search with the samples permuted against their captions and labels, 19 times (fixed
seeds): the best AUROC chance alone gives a feature among this many terms. A feature whose best term does
not beat its floor is "unlabelled" (a feature unrelated to every term is labelled with probability 0.05).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

import data
from errors import UserError, check_positive, cli
from probe import column_auroc
from saeshare.core.options import OutputOptions, parse
from saeshare.disk.results import FeatureLabel, LabelAgreement, Labels
from saeshare.disk.runs import NULL_SEED, Run, null_permutation
from saeshare.engine.options import AnalysisOptions

UNLABELLED = "unlabelled"
FLOOR_DRAWS = 19
"""Permutations of the floor: a feature is labelled when its best AUROC beats the best of all of them, which a
feature unrelated to every term does with probability 1 / (19 + 1) = 0.05."""


@dataclass(kw_only=True)
class LabelsArgs(OutputOptions, AnalysisOptions):
    run: str
    layer: int | None = None
    """Layer of --run (default: the last recorded; -1 = last)."""
    label_column: str | None = None
    """Hub or local datasets: a column whose classes are candidate labels too (shapes: its attributes)."""
    min_samples: int = 20
    """A term (or label) is a candidate when at least this many samples hold it, and as many do not: an AUROC on
    a handful of samples swings widely by chance, which raises every feature's floor."""
    top_terms: int = 5
    """Terms kept per feature in the JSON, best first."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("min_samples", self.min_samples)
        check_positive("top_terms", self.top_terms)


def candidates(ds: data.PairedDataset, min_samples: int, label_column: str | None) -> tuple[list[str], np.ndarray]:
    """(terms, holds_NT): caption words and two-word phrases in at least `min_samples` captions, then the
    dataset's labels as `label:NAME` (shapes' attributes, or the classes of a label column)."""
    from sklearn.feature_extraction.text import CountVectorizer

    captions = [ds.caption(i) for i in range(len(ds))]
    vectorizer = CountVectorizer(stop_words="english", ngram_range=(1, 2), binary=True,
                                 min_df=min(min_samples, len(ds)))
    try:
        holds = vectorizer.fit_transform(captions).toarray().astype(bool)
        terms = list(vectorizer.get_feature_names_out())
    except ValueError:  # no term in enough captions
        holds, terms = np.zeros((len(ds), 0), dtype=bool), []
    if isinstance(ds, data.ShapesDataset) or label_column is not None:
        names, labels_NL = data.label_matrix(ds, label_column)
        terms, holds = terms + [f"label:{n}" for n in names], np.concatenate([holds, labels_NL], axis=1)
    if not terms:
        raise UserError(f"no caption term is in {min_samples} or more of the {len(ds)} captions, and the dataset "
                        "has no labels: lower --min_samples")
    return terms, holds


def label_features(codes_NF: np.ndarray, terms: list[str], holds_NT: np.ndarray, top_terms: int,
                   min_samples: int = 20, seed: int = NULL_SEED) -> dict[int, FeatureLabel]:
    """Every feature's best terms by AUROC, and its floor: the best AUROC over the same terms with the samples
    permuted, the largest of FLOOR_DRAWS permutations. Features that never fire are left out."""
    n_T = holds_NT.sum(0)
    scorable = (n_T >= min_samples) & (n_T <= len(holds_NT) - min_samples)
    terms = [t for t, ok in zip(terms, scorable) if ok]
    if not terms:
        raise UserError(f"no candidate term is held by at least {min_samples} of the {len(holds_NT)} samples and "
                        "missed by as many: lower --min_samples")
    holds_NT = holds_NT[:, scorable]
    fired = np.flatnonzero((codes_NF > 0).any(0))
    auroc_TF = np.nan_to_num(column_auroc(codes_NF[:, fired], holds_NT), nan=0.5)
    floor_F = np.max([np.nan_to_num(column_auroc(codes_NF[null_permutation(len(codes_NF), seed + r)][:, fired],
                                                 holds_NT), nan=0.5).max(0) for r in range(FLOOR_DRAWS)], axis=0)
    out = {}
    for j, f in enumerate(fired):
        order = np.argsort(-auroc_TF[:, j], kind="stable")[:top_terms]
        best = float(auroc_TF[order[0], j])
        out[int(f)] = FeatureLabel(terms[order[0]] if best > floor_F[j] else UNLABELLED, best, float(floor_F[j]),
                                   {terms[t]: float(auroc_TF[t, j]) for t in order})
    return out


class Named(NamedTuple):
    features: dict[int, FeatureLabel]
    n_terms: int


_named: dict[tuple, Named] = {}


def named(run: Run, layer: int, codes: str = "relu", device: str | torch.device = "cpu", min_samples: int = 20,
          top_terms: int = 5, label_column: str | None = None) -> Named:
    """The labels of one layer's firing features, computed once per process for each write, seed and
    permutation of a run (Run.key), layer and settings: a gallery, an agreement and the demo read the same."""
    layer = run.resolve_layer(layer)
    key = (run.key, layer, codes, min_samples, top_terms, label_column)
    if key not in _named:
        terms, holds_NT = candidates(data.from_description(run.meta.dataset), min_samples, label_column)
        codes_NF = run.dense_codes(layer, codes, device=device).cpu().numpy()
        _named[key] = Named(label_features(codes_NF, terms, holds_NT, top_terms, min_samples), len(terms))
    return _named[key]


def labels(run: Run, args: LabelsArgs) -> Labels:
    layer = run.resolve_layer(-1 if args.layer is None else args.layer)
    got = named(run, layer, args.codes or "relu", args.torch_device, args.min_samples, args.top_terms,
                args.label_column)
    return Labels(run=run.name, layer=layer, codes=args.codes or "relu", n_terms=got.n_terms, features=got.features)


AGREEMENT_SHUFFLES = 200
"""Shuffles of the matches behind the agreement's floor."""


def label_words(label: str) -> frozenset[str]:
    """The words of a label, without the `label:` of the dataset's labels, as a caption says them (shapes'
    attribute "bg:blue" is "blue background")."""
    label = label.removeprefix("label:")
    if label.startswith("bg:"):
        label = label.removeprefix("bg:") + " background"
    return frozenset(label.split())


def agreement(labels_a: dict[int, FeatureLabel], labels_b: dict[int, FeatureLabel], match_F: np.ndarray,
              seed: int = NULL_SEED) -> LabelAgreement:
    """Of A's labelled features whose best match in B is labelled too, the share whose labels agree: share a
    word ("label:star", "star" and "black star" agree; "red" and "star" do not). The floor is that share with
    the pairs' B sides shuffled among them (the same labels, matched at random)."""
    pairs = [(label_words(lab.label), label_words(labels_b[int(match_F[f])].label)) for f, lab in labels_a.items()
             if lab.label != UNLABELLED and int(match_F[f]) in labels_b
             and labels_b[int(match_F[f])].label != UNLABELLED]
    if not pairs:
        return LabelAgreement(0, float("nan"), float("nan"))
    a, b = zip(*pairs)

    def share(order) -> float:
        return float(np.mean([bool(a[i] & b[j]) for i, j in enumerate(order)]))

    rng = np.random.default_rng(seed)
    floor = float(np.mean([share(rng.permutation(len(b))) for _ in range(AGREEMENT_SHUFFLES)]))
    return LabelAgreement(len(pairs), share(range(len(b))), floor)


@cli
def main(argv=None):
    args = parse(LabelsArgs, argv, "Name SAE features by the caption terms and labels they predict")
    res = labels(Run.open(args.root, args.run), args)
    named = {f: lab for f, lab in res.features.items() if lab.label != UNLABELLED}
    print(f"{res.run} layer {res.layer}: {len(named)} of {len(res.features)} firing features labelled "
          f"(best AUROC over {res.n_terms} terms above its permuted floor)")
    for f, lab in sorted(named.items(), key=lambda kv: -kv[1].score)[:10]:
        print(f"  #{f}: {lab.label} (AUROC {lab.score:.3f}, floor {lab.floor:.3f})")
    args.write(res)


if __name__ == "__main__":
    main()
