"""Name features from what their samples say: for every feature of one layer, the caption term (word or
two-word phrase, English stop words out) or ground-truth label (shapes attributes, or the classes of a
label column) whose presence its activation predicts best, by AUROC over all samples.

    uv run labels.py --run effnet --json labels.json           # the run's last layer
    uv run labels.py --run clip --layer 10 --label_column label

The floor is the same search with the samples permuted against their captions and labels, 19 times (fixed
seeds): the best AUROC chance alone gives a feature among this many terms. A feature whose best term does
not beat its floor is "unlabelled" (a feature unrelated to every term is labelled with probability 0.05).
Two more opinions on the same terms: MiniLM's embedding of the top captions (on by default), and with
--clip_model_name a CLIP model's zero-shot similarity to each sample, correlated with the feature.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

import data
from errors import UserError, check_positive, cli
from probe import column_auroc
from saeshare.core.clip import ClipEmbedder
from saeshare.core.options import OutputOptions, parse
from saeshare.core.progress import progress
from saeshare.disk.results import FeatureLabel, LabelAgreement, Labels
from saeshare.disk.runs import NULL_SEED, Run, null_permutation
from saeshare.engine.options import AnalysisOptions

UNLABELLED = "unlabelled"
EMBED_BASELINE = 2048
"""Captions whose mean embedding is the embedding scorer's baseline (a fixed random sample)."""
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
    embed_top: int = 9
    """The MiniLM scorer reads each feature's this many most activating captions (0 = no MiniLM scorer)."""
    clip_model_name: str | None = None
    """Zero-shot names too, with this CLIP-family model (open_clip name, hf-hub: id or local folder): the term
    whose CLIP similarity to each sample (its image, or for a text run its caption) tracks the feature."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("min_samples", self.min_samples)
        check_positive("top_terms", self.top_terms)
        if self.embed_top < 0:
            raise UserError(f"--embed_top must be >= 0 (0 = no MiniLM scorer), got {self.embed_top}")


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


def scorable(terms: list[str], holds_NT: np.ndarray, min_samples: int) -> tuple[list[str], np.ndarray]:
    """The terms held by at least `min_samples` samples and missed by as many, with their columns."""
    n_T = holds_NT.sum(0)
    keep = (n_T >= min_samples) & (n_T <= len(holds_NT) - min_samples)
    if not keep.any():
        raise UserError(f"no candidate term is held by at least {min_samples} of the {len(holds_NT)} samples and "
                        "missed by as many: lower --min_samples")
    return [t for t, ok in zip(terms, keep) if ok], holds_NT[:, keep]


def column_correlation(x_NF: np.ndarray, y_NT: np.ndarray) -> np.ndarray:
    """[T, F] Pearson correlation of every column of x with every column of y over the rows (0 where a
    column is constant)."""
    def z(a):
        a = np.asarray(a, dtype=np.float64) - np.mean(a, axis=0)
        norm = np.linalg.norm(a, axis=0)
        return a / np.where(norm > 0, norm, np.inf)
    return z(y_NT).T @ z(x_NF)


def named_by(score: Callable[[np.ndarray, np.ndarray], np.ndarray], codes_NF: np.ndarray, terms: list[str],
             target_NT: np.ndarray, top_terms: int, seed: int = NULL_SEED) -> dict[int, FeatureLabel]:
    """Every firing feature's best terms by `score(codes, target) -> [T, F]`, and its floor: the best score over
    the same terms with the samples permuted, the largest of FLOOR_DRAWS permutations. The label is the best
    term where it beats the floor."""
    fired = np.flatnonzero((codes_NF > 0).any(0))
    score_TF = np.nan_to_num(score(codes_NF[:, fired], target_NT), nan=0.5)
    floor_F = np.max([np.nan_to_num(score(codes_NF[null_permutation(len(codes_NF), seed + r)][:, fired], target_NT),
                                    nan=0.5).max(0) for r in range(FLOOR_DRAWS)], axis=0)
    out = {}
    for j, f in enumerate(fired):
        order = np.argsort(-score_TF[:, j], kind="stable")[:top_terms]
        best = float(score_TF[order[0], j])
        out[int(f)] = FeatureLabel(terms[order[0]] if best > floor_F[j] else UNLABELLED, best, float(floor_F[j]),
                                   {terms[t]: float(score_TF[t, j]) for t in order})
    return out


def label_features(codes_NF: np.ndarray, terms: list[str], holds_NT: np.ndarray, top_terms: int,
                   min_samples: int = 20, seed: int = NULL_SEED) -> dict[int, FeatureLabel]:
    """Every feature's best terms by AUROC of its activation for "the sample holds the term", with the
    permuted floor. Features that never fire are left out."""
    terms, holds_NT = scorable(terms, holds_NT, min_samples)
    return named_by(column_auroc, codes_NF, terms, holds_NT, top_terms, seed)


def term_text(term: str) -> str:
    """A term as a caption says it: without the `label:` of the dataset's labels, and shapes' attribute
    "bg:blue" as "blue background"."""
    term = term.removeprefix("label:")
    return term.removeprefix("bg:") + " background" if term.startswith("bg:") else term


def embedding_terms(ds: data.PairedDataset, codes_NF: np.ndarray, features: list[int], terms: list[str],
                    top_terms: int, n_top: int, device) -> dict[int, dict[str, float]]:
    """The second scorer, with the packaged all-MiniLM-L6-v2: for each feature, the cosine of each term's
    embedding with the mean embedding of the captions of its `n_top` most activating samples, less the same
    with the mean of (up to EMBED_BASELINE) all captions, so that a term close to every caption wins none."""
    top_KF = np.argsort(-codes_NF[:, features], axis=0, kind="stable")[:n_top]
    base = np.random.default_rng(NULL_SEED).permutation(len(ds))[:EMBED_BASELINE]
    rows = sorted(set(top_KF.ravel().tolist()) | set(base.tolist()))
    embedded = embed_texts([ds.caption(n) for n in rows] + [term_text(t) for t in terms], device)
    at = {n: i for i, n in enumerate(rows)}
    captions_ND, terms_TD = embedded[:len(rows)], embedded[len(rows):]
    mean_all = captions_ND[[at[n] for n in base]].mean(0)
    out = {}
    for j, f in enumerate(features):
        top = [at[int(n)] for n in top_KF[:, j] if codes_NF[n, f] > 0]
        lift_T = terms_TD @ (captions_ND[top].mean(0) - mean_all)
        order = np.argsort(-lift_T, kind="stable")[:top_terms]
        out[f] = {terms[t]: float(lift_T[t]) for t in order}
    return out


def embed_texts(texts: list[str], device, batch_size: int = 256) -> np.ndarray:
    """[n, 384] unit-norm sentence embeddings by all-MiniLM-L6-v2's own recipe (the mean of its last layer's
    tokens)."""
    from wrappedmodels import MINILM_NAMES, Bert

    model = Bert(MINILM_NAMES[0], device=device)
    out = []
    for start in progress(range(0, len(texts), batch_size), desc="MiniLM", unit="batch", leave=False):
        inputs = model.collate(texts[start:start + batch_size])
        with torch.no_grad():
            hidden = model.model(**{k: v.to(model.device) for k, v in inputs.items() if k != "token_mask"})[0]
        out.append(torch.nn.functional.normalize(model.pool(hidden, inputs["token_mask"].to(model.device)), dim=1))
    return torch.cat(out).double().cpu().numpy()


def zero_shot_similarity(ds: data.PairedDataset, modality: str, clip_model_name: str, terms: list[str], device,
                         batch_size: int = 64) -> np.ndarray:
    """[N, T] cosine of every sample's CLIP embedding (its image, or for a text run its caption) with every
    term's text embedding (the term as it is, no prompt template)."""
    clip = ClipEmbedder(clip_model_name, device)
    terms_TD = clip.texts([term_text(t) for t in terms])
    out = []
    for start in progress(range(0, len(ds), batch_size), desc=f"CLIP {clip_model_name}", unit="batch"):
        rows = range(start, min(len(ds), start + batch_size))
        emb = (clip.images([ds.image(n) for n in rows]) if modality == "image"
               else clip.texts([ds.caption(n) for n in rows]))
        out.append((emb @ terms_TD.T).double().cpu())
    return torch.cat(out).numpy()


class Named(NamedTuple):
    features: dict[int, FeatureLabel]
    n_terms: int


_named: dict[tuple, Named] = {}


def named(run: Run, layer: int, codes: str = "relu", device: str | torch.device = "cpu", min_samples: int = 20,
          top_terms: int = 5, label_column: str | None = None, embed_top: int = 0,
          clip_model_name: str | None = None) -> Named:
    """The labels of one layer's firing features, computed once per process for each write, seed and
    permutation of a run (Run.key), layer and settings: a gallery, an agreement and the demo read the same."""
    layer = run.resolve_layer(layer)
    key = (run.key, layer, codes, min_samples, top_terms, label_column, embed_top, clip_model_name)
    if key not in _named:
        ds = data.from_description(run.meta.dataset)
        terms, holds_NT = scorable(*candidates(ds, min_samples, label_column), min_samples)
        codes_NF = run.dense_codes(layer, codes, device=device).cpu().numpy()
        features = named_by(column_auroc, codes_NF, terms, holds_NT, top_terms)
        if embed_top:
            for f, best in embedding_terms(ds, codes_NF, list(features), terms, top_terms, embed_top, device).items():
                features[f].embedding = best
        if clip_model_name is not None:
            sims_NT = zero_shot_similarity(ds, run.meta.modality, clip_model_name, terms, device)
            for f, lab in named_by(column_correlation, codes_NF, terms, sims_NT, top_terms).items():
                features[f].zero_shot = lab
        _named[key] = Named(features, len(terms))
    return _named[key]


def labels(run: Run, args: LabelsArgs) -> Labels:
    layer = run.resolve_layer(-1 if args.layer is None else args.layer)
    got = named(run, layer, args.codes or "relu", args.torch_device, args.min_samples, args.top_terms,
                args.label_column, args.embed_top, args.clip_model_name)
    return Labels(run=run.name, layer=layer, codes=args.codes or "relu", n_terms=got.n_terms, features=got.features)


AGREEMENT_SHUFFLES = 200
"""Shuffles of the matches behind the agreement's floor."""


def label_words(label: str) -> frozenset[str]:
    """The words of a label, as a caption says them."""
    return frozenset(term_text(label).split())


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
    for scorer, best in (("MiniLM", lambda lab: next(iter(lab.embedding), None)),
                         ("CLIP", lambda lab: lab.zero_shot and lab.zero_shot.label)):
        other = {f: FeatureLabel(best(lab), 0.0, 0.0, {}) for f, lab in named.items() if best(lab) is not None}
        if other:
            same = agreement(named, other, np.arange(max(other) + 1))
            print(f"{scorer}'s name shares a word with the AUROC label on {same.share:.2f} of {same.n_pairs} labelled "
                  f"features (names shuffled among them: {same.floor:.2f})")
    for f, lab in sorted(named.items(), key=lambda kv: -kv[1].score)[:10]:
        also = f"; MiniLM: {next(iter(lab.embedding))}" if lab.embedding else ""
        if lab.zero_shot is not None:
            also += f"; CLIP: {lab.zero_shot.label} (r {lab.zero_shot.score:.3f}, floor {lab.zero_shot.floor:.3f})"
        print(f"  #{f}: {lab.label} (AUROC {lab.score:.3f}, floor {lab.floor:.3f}){also}")
    args.write(res)


if __name__ == "__main__":
    main()
