"""Result files (docs/design.md#versioned-files): what wmppc.py, comp_sharedness.py, similarity.py, probe.py,
ood.py, ontology.py, demo.py and study.py write and show.py and the reports read, as typed records with a
schema number (see files.py), and the constants that name their parts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from saeshare.disk.files import Record
from saeshare.disk.runs import RunMeta


@dataclass
class Scores:
    """A pair of all-layers and last-layer values: a floor, a ceiling, bias-corrected scores, standard errors."""
    all_layers: float
    last_layer: float
    corrected: Scores | None = None
    """A floor's or ceiling's jackknife bias-corrected values (with --ci)."""


@dataclass
class Intervals:
    """95% jackknife intervals [lo, hi] of every wMPPC reported, centred on the bias-corrected score (see
    wmppc.jackknife)."""
    all_layers: list[float]
    last_layer: list[float]
    layer_matrix: np.ndarray
    """[L_A, L_B, 2]."""


@dataclass
class Wmppc(Record):
    """wMPPC of run A -> run B."""
    KIND = "wmppc"
    SCHEMA = 1

    source: str
    target: str
    codes: str
    all_layers: float
    """Every feature of every layer of A takes its best match over all layers of B; per-layer values
    averaged weighted by feature count."""
    last_layer: float
    """Last recorded layer of A against last of B."""
    layer_matrix: np.ndarray
    """[L_A, L_B]: wMPPC of layer a of A against layer b of B (indexed by position in the layer lists)."""
    source_layers: list[int]
    target_layers: list[int]
    ci: Intervals | None = None
    """With --ci: 95% intervals, centred on the bias-corrected scores."""
    corrected: Scores | None = None
    """With --ci: the jackknife bias-corrected scores (all_layers / last_layer above are the paper's,
    uncorrected, for comparison with it)."""
    se: Scores | None = None
    """With --ci: the jackknife standard errors."""
    floor: Scores | None = None
    """With --calibrate: A against B's samples permuted."""
    ceiling: Scores | None = None
    """With --calibrate, when A has several SAE seeds: A's first seed against its others."""
    warnings: list[str] = field(default_factory=list)
    """The runs' SAE problems, a line per layer (too few steps, not converged, poor fit)."""
    label_agreement: LabelAgreement | None = None
    """With --labels: last layer against last layer, how often matched features carry the same label."""
    geometry: list[GeometryScores] | None = None
    """With --geometry: SVCCA and RSA of matched features' decoder rows, per layer pair."""

    def near_floor(self) -> str | None:
        """One line when the all-layers score (corrected) is within two standard errors of its floor."""
        if self.se is None or self.floor is None:
            return None
        score, floor = self.corrected.all_layers, (self.floor.corrected or self.floor).all_layers
        if score - floor >= 2 * self.se.all_layers:
            return None
        return (f"{self.source} -> {self.target}: {score:.4f} is within two standard errors "
                f"({self.se.all_layers:.4f}) of its floor {floor:.4f}: no sharing above chance is shown")


@dataclass
class WmppcTable(Record):
    """wMPPC of every ordered pair of runs, row -> column; NaN (JSON null) on the diagonal."""
    KIND = "wmppc_table"
    SCHEMA = 1

    runs: list[str]
    codes: str
    all_layers: np.ndarray
    """[R, R]."""
    last_layer: np.ndarray
    """[R, R]."""
    ci: dict[str, np.ndarray] | None = None
    """"all_layers"/"last_layer" -> [R, R, 2] intervals, around the corrected scores (with --ci)."""
    corrected: dict[str, np.ndarray] | None = None
    """"all_layers"/"last_layer" -> [R, R] bias-corrected scores (with --ci); floors and ceilings above are
    the corrected ones when computed with --ci."""
    floor: dict[str, np.ndarray] | None = None
    """"all_layers"/"last_layer" -> [R, R] (with --calibrate)."""
    ceiling: dict[str, np.ndarray] | None = None
    """"all_layers"/"last_layer" -> [R, R], the row run's seeds (with --calibrate, runs with several seeds)."""
    warnings: list[str] = field(default_factory=list)
    """The runs' SAE problems, a line per layer (too few steps, not converged, poor fit)."""


@dataclass
class SharedFeature:
    """One feature of M ranked by Comparative Sharedness."""
    feature: int
    delta: float
    rho: dict[str, float]
    """run of G or H -> rho_i^{M->run}."""
    match: dict[str, int]
    """run of G or H -> its best-matching feature."""
    mass: float | None = None
    """Activation mass S_i (may be absent from a hand-made file: show.py computes it anyway)."""


@dataclass
class SharednessReport(Record):
    """The top features of comp_sharedness.py (its --json; show.py --from_json reads it)."""
    KIND = "comp_sharedness"
    SCHEMA = 1
    DESCRIPTION = "a comp_sharedness.py --json output"

    source: str
    min_group: list[str]
    max_group: list[str]
    features: list[SharedFeature]
    """Best first."""
    codes: str = "relu"
    layers: dict[str, int] | None = None
    """The layer used for each run, source included (None: the last recorded layer of each)."""
    null: bool = False
    """The groups' samples were permuted (--null permute): a floor. The names are the runs' own."""
    warnings: list[str] = field(default_factory=list)
    """The runs' SAE problems, a line per layer (too few steps, not converged, poor fit)."""
    label_agreement: dict[str, "LabelAgreement"] | None = None
    """With --labels: per run of G and H, how often the top features' best matches carry their labels."""

    @classmethod
    def migrate(cls, obj: dict, schema: int | None) -> dict:
        if schema is None:  # written before result files had a schema: the same keys
            return obj
        return super().migrate(obj, schema)


Measure = Literal["cka", "cka_debiased", "svcca", "mknn"]
MEASURES: tuple[str, ...] = Measure.__args__
"""The classic measures of similarity.py."""


@dataclass
class MeasureValues:
    last_layer: float
    layer_matrix: np.ndarray
    """[L_A, L_B]."""


@dataclass
class Similarity(Record):
    """The classic measures of run A against run B, every layer pair, with their floor and ceiling."""
    KIND = "similarity"
    SCHEMA = 1

    source: str
    target: str
    source_layers: list[int]
    target_layers: list[int]
    measures: dict[str, MeasureValues]
    floor: dict[str, float]
    """measure -> last-layer value against B's samples permuted."""
    ceiling: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in MEASURES})
    """measure -> its value for identical representations."""


@dataclass
class SimilarityTable(Record):
    """Last-layer measures of every ordered pair of runs, row -> column (NaN on the diagonal)."""
    KIND = "similarity_table"
    SCHEMA = 1

    runs: list[str]
    measures: dict[str, np.ndarray]
    """measure -> [R, R]."""
    floor: dict[str, np.ndarray]
    """measure -> [R, R], against the column's samples permuted."""


@dataclass
class AttributeMatch:
    """The ground-truth attribute (shapes) best correlated with a shared feature and with its match."""
    feature: int
    attribute: str
    r: float
    match_attribute: str
    match_r: float


PROBE_KINDS = ("sae", "raw", "random", "sae_top", "raw_top")
"""What each probe reads: SAE codes, raw activations, random features, and the two sparse probes."""


@dataclass
class ProbeResults(Record):
    """probe.py --json (docs/design.md#probes)."""
    KIND = "probe"
    SCHEMA = 1

    run: str
    test: str
    """The test run, or "<run> (held out)"."""
    codes: str
    top_n: int
    layers: list[int]
    labels: list[str]
    """shapes attributes, or classes of `label_column`."""
    balanced_accuracy: dict[str, np.ndarray]
    """kind -> [L, labels]."""
    auroc: dict[str, np.ndarray]
    """kind -> [L, labels]."""
    train_where: list[str] = field(default_factory=list)
    test_where: list[str] = field(default_factory=list)
    label_column: str | None = None


SAE_OOD_SCORES = ("recon_error", "low_energy", "low_max", "knn_codes")
RAW_OOD_SCORES = ("mahalanobis", "knn_raw")
OOD_SCORES = SAE_OOD_SCORES + RAW_OOD_SCORES
OOD_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")


@dataclass
class OodResults(Record):
    """ood.py --json (docs/design.md#probes)."""
    KIND = "ood"
    SCHEMA = 1

    fit: str
    id: str
    ood: str
    layers: list[int]
    metrics: dict[str, dict[str, list[float]]]
    """score -> metric -> one value per layer."""


@dataclass
class FeatureLabel:
    """One feature's name (labels.py)."""
    label: str
    """The term whose presence its activation predicts best, or "unlabelled" when that does not beat the floor."""
    score: float
    """That term's AUROC."""
    floor: float
    """The best AUROC over the same terms with the samples permuted (the largest of 19 permutations)."""
    terms: dict[str, float]
    """The best terms with their AUROC (or, in `zero_shot`, their correlation), best first."""
    embedding: dict[str, float] = field(default_factory=dict)
    """The best terms by the second scorer, MiniLM: the cosine of the term with the mean embedding of the
    feature's top captions less that with the mean of all captions; best first."""
    zero_shot: FeatureLabel | None = None
    """With a CLIP-family model: the term whose CLIP similarity to each sample correlates best with the
    feature's activation over samples (Pearson r), with its permuted floor and best terms."""


@dataclass
class GeometryScores:
    """Lan et al.'s measures for one layer pair (wmppc.py --geometry): matched features' decoder rows compared,
    against the same with the pairing shuffled (mean of the shuffles, and the p-value of the score)."""
    layer_a: int
    layer_b: int
    n_pairs: int
    svcca: float
    svcca_null: float
    """Mean over the shuffled pairings."""
    svcca_p: float
    """(1 + shuffles scoring at least as high) / (1 + shuffles)."""
    rsa: float
    """Pearson correlation of the two sides' cosine-similarity matrices (above the diagonal)."""
    rsa_null: float
    rsa_p: float


@dataclass
class LabelAgreement:
    """Do matched features mean the same thing? (wmppc.py --labels)"""
    n_pairs: int
    """A's labelled features whose best match in B is labelled too."""
    share: float
    """Of those, the share whose two labels agree (share a word: "label:star", "star", "black star")."""
    floor: float
    """The same share with the matches shuffled among the pairs."""


@dataclass
class Labels(Record):
    """labels.py --json."""
    KIND = "labels"
    SCHEMA = 1

    run: str
    layer: int
    codes: str
    n_terms: int
    """Candidate terms: caption words and phrases, and the dataset's labels."""
    features: dict[int, FeatureLabel]
    """Feature id -> its label; features that never fire are left out."""


ONTOLOGY_KINDS = ("sae", "raw", "null")
"""What ontology.py scores: SAE codes, raw neurons, and the null (permuted samples or another run)."""


@dataclass
class OntologyResults(Record):
    """ontology.py --json (docs/design.md#probes)."""
    KIND = "ontology"
    SCHEMA = 1

    run: str
    null: str
    """"<run> (permuted)" or the null run's name."""
    codes: str
    threshold: float
    top_samples: int
    layers: list[int]
    nodes: list[str]
    depth: list[int]
    best_auroc: dict[str, np.ndarray]
    """kind -> [L, nodes]: the largest AUROC of one feature (neuron) for the node; NaN for a node that every
    sample, or none, holds."""
    lca_depth: dict[str, np.ndarray]
    """kind -> [L, depth + 1]: the share of the firing features whose top samples' LCA is at each depth."""
    coverage: dict[str, np.ndarray]
    """kind -> [L]: the share of the scorable nodes with best AUROC >= threshold."""
    mean_lca_depth: dict[str, np.ndarray]
    """kind -> [L]."""
    label_column: str | None = None
    hierarchy: str | None = None
    """The hierarchy file; None: the built-in shapes hierarchy."""


@dataclass
class SaeProbes:
    """The demo's SAE probes (docs/design.md#probes), per demo run (effnet, minilm)."""
    probes: dict[str, ProbeResults]
    """Trained on the run's samples, tested on held-out samples recorded from it."""
    shifted: dict[str, ProbeResults]
    """Trained on one subset (--train_where), tested on another (--test_where)."""
    ood: dict[str, list[OodResults]]
    """One per held-out set (shapes and colours the SAEs never saw)."""
    ontology: dict[str, OntologyResults]


@dataclass
class Compared:
    """What the demo and a study both record: the runs and every ordered pair's scores."""
    config: dict[str, Any]
    """The settings (the demo's options, or the study file as read)."""
    runs: dict[str, RunMeta]
    wmppc: dict[str, Wmppc]
    """"A->B" -> wMPPC of A -> B, every ordered pair (with interval, floor and ceiling when computed)."""
    similarity: dict[str, Similarity]
    """"A->B" -> the classic measures, every ordered pair (empty: not computed)."""


IMAGE, TEXT, NULL = "effnet", "minilm", "null"
"""The demo's runs: the image model, the text model, the null text run."""


@dataclass
class DemoLabels:
    """What the demo's labels (labels.py) say."""
    agreement: dict[str, "LabelAgreement"]
    """Run -> how often the top shared features' best matches there carry their labels."""
    n_top: int
    """The image model's features by activation mass whose labels are checked against ground truth."""
    ground_truth: float
    """Of those, the share whose label is the shapes attribute they correlate with best."""
    ground_truth_floor: float
    """The same share with the labels shuffled among those features."""


@dataclass
class DemoResults(Compared, Record):
    """Everything demo.py measured; saeshare.render.demo_report renders it."""
    KIND = "demo"
    SCHEMA = 1

    train_seconds: dict[str, float]
    """0 for a reused run."""
    poor_fits: list[str]
    """Layers (of every run and seed) whose SAE reconstructs the recorded pooled token worse than its mean."""
    sharedness: SharednessReport
    attributes: list[AttributeMatch]
    """For each feature of `sharedness`, in order."""
    gallery: str
    """Path of the gallery page, relative to the report."""
    grids: list[str]
    """The grid image of each feature of `sharedness`, relative to the report."""
    seconds: float
    peak_rss_gib: float
    probes: SaeProbes | None = None
    """None with --no_probes."""
    headline: dict[str, Wmppc] = field(default_factory=dict)
    """"A->B" -> wMPPC of the image run against the text and null runs on the layers whose SAEs fit the
    recorded token (fvu_pooled <= 1), with interval and bias correction."""
    left_out: dict[str, list[int]] = field(default_factory=dict)
    """Run -> the layers the headline and the top shared features leave out (their SAEs do not fit)."""
    labels: DemoLabels | None = None
    joint: dict[str, JointReport] = field(default_factory=dict)
    """"METHOD A->B" -> a joint dictionary over the image run and the text run, and over the image and null runs."""


@dataclass
class StudyResults(Compared, Record):
    """<out>/results.json: everything the study measured; its report renders it."""
    KIND = "study"
    SCHEMA = 1

    table: WmppcTable
    sharedness: list[SharednessReport] = field(default_factory=list)
    galleries: list[str] = field(default_factory=list)
    """The gallery page of each group, relative to <out>."""
    grids: list[list[str]] = field(default_factory=list)
    """Per group, the grid image of each of its source features, relative to <out>."""
    joint: dict[str, JointReport] = field(default_factory=dict)
    """"METHOD A->B" -> with `[[analyses.joint]]`: a joint dictionary over each group's source and its first
    shared run, and its source and first not-shared run."""


@dataclass
class JointScores:
    """What a joint dictionary over several runs says is shared (joint.py); matrices are over the runs, row =
    from, column = to."""
    shared_fraction: float
    """The shared latents' part of the dictionary's weight (decoder norm times code mass, over streams)."""
    private_fraction: list[float]
    """Per run, its private latents' part of the weight."""
    shared_latents: float
    """Of the live latents, the share that is shared (by count, as the crosscoder literature counts)."""
    private_latents: list[float]
    """Per run, the share of live latents private to it."""
    live_latents: int
    jaccard: np.ndarray
    """[S, S] mean over samples of the Jaccard index of the latents each run's stream picks alone."""
    cross_r2: np.ndarray
    """[S, S] R^2 of run t's activations decoded from run s's code alone (diagonal: a stream alone, itself)."""
    fvu: list[float]
    """Per run, FVU under the joint code."""
    epochs: int
    loss: list[float]
    """Mean training loss of each epoch (training stops when an epoch lowers it by less than --min_gain)."""


@dataclass
class JointMatch:
    """The first run's own SAE features against the joint latents (stream of that run), by correlation."""
    wmppc: float
    """sum_i S_i rho_i / sum_i S_i over the run's features, rho_i the best correlation with a joint latent."""
    shared_mass: float
    """The part of the run's activation mass on features whose best latent is shared."""
    latent: list[int]
    rho: list[float]


@dataclass
class JointReport(JointScores, Record):
    """joint.py --json: the scores of the runs as given; `floor`: the same training with every run but the
    first read through a permutation of its samples."""
    KIND = "joint"
    SCHEMA = 1

    runs: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    method: str = "sparc"
    n_latents: int = 0
    top_k: int = 0
    n_samples: int = 0
    n_measured: int = 0
    """Samples the scores are measured on: held out of training (all of them with --holdout 0)."""
    floor: JointScores | None = None
    match: JointMatch | None = None
    share: np.ndarray | None = None
    """[S, F] each latent's weight in each run over its largest run's (0: dead)."""
    floor_share: np.ndarray | None = None


@dataclass
class SteeredImage:
    """One image steer.py generated (steer.json's `images`)."""
    feature: int | None
    """The steered feature; None for the unsteered pipeline (alpha 0, shared by every feature)."""
    alpha: float
    """In units of the feature's typical activation (its mean top-k code where it fires on the run's samples)."""
    prompt: str
    seed: int
    file: str
    """Relative to the output folder."""
    text_change: float
    """||steered - plain|| / ||plain|| of the text encoder's output for the prompt (0 at alpha 0)."""
    direction: str = "feature"
    """"feature", or "random N": the N-th random direction of the feature's norm (the floor)."""


@dataclass
class SteerName:
    """What a steered feature raises most in the images, by one scorer."""
    scorer: str
    name: str
    """The label, or the vision feature ("RUN #12"), that rises most."""
    rise: float
    """Its mean rise from the unsteered images (CLIP cosine; a vision feature in standard deviations over its
    run's samples)."""
    floor: float
    """The largest rise of any label (vision feature) under random directions of the same norm."""


@dataclass
class CausalMatch:
    """A text feature steered, and its wMPPC match in a vision run measured on the images (steer.py --match)."""
    feature: int
    rho: float
    vision_feature: int
    rise: float
    """The vision feature's mean rise (in its standard deviations) from the unsteered images."""
    floor: float
    """The largest rise of that vision feature under random directions of the same norm."""
    ratio: float
    """rise / floor (nan when the floor is not positive)."""


@dataclass
class SteeredFeature:
    feature: int
    typical: float
    """Its mean top-k code where it fires on the run's samples: alpha's unit."""
    norm: float
    """||W_dec[f]|| x typical: the length of the vector added at alpha 1."""
    top_captions: list[str] = field(default_factory=list)
    """The run's captions it fires on most, best first."""
    names: list[SteerName] = field(default_factory=list)
    """With --discover, --score_run or --labels: per scorer, what it raises most."""


@dataclass
class SteerReport(Record):
    """steer.py's steer.json: the settings, every image made, and what the scorers measured."""
    KIND = "steer"
    SCHEMA = 1

    pipeline: str
    run: str
    layer: int
    positions: str
    both_branches: bool
    alphas: list[float]
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    height: int | None
    width: int | None
    dtype: str
    features: list[SteeredFeature] = field(default_factory=list)
    images: list[SteeredImage] = field(default_factory=list)
    measured_alpha: float | None = None
    """The alpha whose images the scorers compare with alpha 0's (the largest given)."""
    n_random: int = 0
    matches: list[CausalMatch] | None = None
    match_target: str | None = None
    """With --match: the vision run and layer whose matched features are measured."""


@dataclass
class DiscoverReport(Record):
    """steer.py --discover's discover.json: each steered feature named by what rises most in its images."""
    KIND = "steer_discover"
    SCHEMA = 1

    run: str
    layer: int
    measured_alpha: float
    n_random: int
    prompts: list[str]
    features: list[SteeredFeature] = field(default_factory=list)
