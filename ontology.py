"""Does a layer's SAE recover the ontology of its labels (docs/design.md#probes, after Olson et al., arXiv 2508.11277)?

    uv run ontology.py --run effnet                        # shapes: the built-in hierarchy
    uv run ontology.py --run dino_in1k --label_column label --hierarchy wordnet.json

For a hierarchy of labels (a node holds a sample when one of the labels under it does), per layer:
- coverage: the share of the hierarchy's nodes that some single feature detects, i.e. whose values score
  the node with AUROC >= --threshold (0.9) over the run's samples;
- LCA depth: per feature, the depth of the deepest node that every one of its --top_samples most
  activating samples holds (the lowest common ancestor of their labels; the root is depth 0), averaged
  over the features that fire on that many samples.
For the SAE's codes, for the raw neurons (both signs: a neuron's sign is arbitrary) and for a null: the
same codes with the samples permuted (`--null permute`, chance), or another run over the same samples,
such as the SAEs of a randomly initialised encoder (`--null RUN`).

A hierarchy file is JSON: an object whose keys are nodes and whose values are either a nested object or
a list of labels (the leaves), e.g. {"animal": {"dog": ["n02085620", "n02085782"], "cat": [...]}}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from errors import UserError, check_positive, cli
from probe import column_auroc, run_labels
from saeshare.core.options import OutputOptions, parse
from saeshare.core.progress import progress
from saeshare.disk.results import ONTOLOGY_KINDS, OntologyResults
from saeshare.disk.runs import Run, check_comparable
from saeshare.engine.options import AnalysisOptions
from saeshare.render.figures import format_layer_table, pyplot, save

SHAPES_HIERARCHY = {
    "colour": {"warm": ["red", "orange", "yellow"], "cool": ["green", "blue", "purple"],
               "achromatic": ["white", "black"]},
    "shape": {"round": ["circle"], "angular": ["square", "diamond", "cross"], "pointed": ["triangle", "star"]},
    "size": ["small", "large"],
}
"""The built-in hierarchy of shapes' attributes (positions and backgrounds left out)."""


class Hierarchy(NamedTuple):
    nodes: list[str]
    """Every node but the root, parents before children; the leaves are labels."""
    depth: np.ndarray
    """[nodes] int: 1 for the root's children."""
    leaves: list[list[str]]
    """The labels under each node (a leaf: itself)."""


def hierarchy(tree: dict, labels: list[str]) -> Hierarchy:
    """Flatten a nested {node: {...} | [labels]} tree; every leaf must be one of `labels`."""
    nodes, depth, leaves = [], [], []

    def walk(name: str, sub, d: int) -> list[str]:
        if name in nodes:
            raise UserError(f"hierarchy: node {name!r} appears twice")
        k = len(nodes)
        nodes.append(name)
        depth.append(d)
        leaves.append([])
        if isinstance(sub, dict):
            under = [leaf for child, grand in sub.items() for leaf in walk(str(child), grand, d + 1)]
        elif isinstance(sub, list) and all(isinstance(x, str) for x in sub):
            under = [leaf for x in sub for leaf in walk(x, None, d + 1)]
        elif sub is None:
            under = [name]
        else:
            raise UserError(f"hierarchy: node {name!r} must hold an object or a list of label names, "
                            f"not {type(sub).__name__}")
        leaves[k] = under
        return under

    if not isinstance(tree, dict) or not tree:
        raise UserError("hierarchy: expected a JSON object of nodes")
    for name, sub in tree.items():
        walk(str(name), sub, 1)
    unknown = sorted({leaf for ls in leaves for leaf in ls} - set(labels))
    if unknown:
        listed = ", ".join(labels[:30]) + (", ..." if len(labels) > 30 else "")
        raise UserError(f"hierarchy names labels the dataset does not have: {', '.join(map(repr, unknown[:10]))} "
                        f"(its labels: {listed})")
    return Hierarchy(nodes, np.array(depth), leaves)


def load_hierarchy(path: str | None, run: Run, column: str | None) -> tuple[Hierarchy, np.ndarray]:
    """(hierarchy, holds_NH): which sample holds which node, from the run's labels."""
    if path is None:
        if column is not None or run.meta.dataset.name != "shapes":
            raise UserError("--hierarchy FILE.json is needed: only shapes has a built-in hierarchy")
        tree = SHAPES_HIERARCHY
    else:
        try:
            tree = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the hierarchy {path!r}: {e}") from None
    names, labels_NL = run_labels(run, None, column)
    tree_ = hierarchy(tree, names)
    col = {n: k for k, n in enumerate(names)}
    holds_NH = np.stack([labels_NL[:, [col[x] for x in ls]].any(1) for ls in tree_.leaves], axis=1)
    return tree_, holds_NH


def lca_depth(x_NF: np.ndarray, holds_NH: np.ndarray, depth_H: np.ndarray, top: int, codes: bool) -> np.ndarray:
    """[F] the depth of the deepest node that each feature's `top` largest-valued samples all hold (0: only
    the root); for `codes`, -1 for a feature positive on fewer than `top` samples (it has no top samples)."""
    top_FK = np.argpartition(-x_NF, top - 1, axis=0)[:top].T
    common_FH = holds_NH[top_FK].all(1)
    out = (common_FH * depth_H).max(1, initial=0)
    if codes:
        out[(x_NF > 0).sum(0) < top] = -1
    return out


def layer_scores(x_NF: np.ndarray, holds_NH: np.ndarray, tree: Hierarchy, top: int,
                 codes: bool) -> tuple[np.ndarray, np.ndarray]:
    """(best AUROC per node [H], share of the firing features per LCA depth [max depth + 1])."""
    best = column_auroc(x_NF, holds_NH).max(1)
    d = lca_depth(x_NF, holds_NH, tree.depth, top, codes)
    d = d[d >= 0]
    return best, np.bincount(d, minlength=tree.depth.max() + 1) / max(len(d), 1)


def ontology(run: Run, null: Run, tree: Hierarchy, holds_NH: np.ndarray, opts: "OntologyArgs") -> OntologyResults:
    if opts.top_samples > run.n_samples:
        raise UserError(f"--top_samples {opts.top_samples}: run {run.name!r} has {run.n_samples} samples")
    layers = [run.resolve_layer(layer) for layer in opts.layers] if opts.layers else run.layers
    best = {k: np.full((len(layers), len(tree.nodes)), np.nan) for k in ONTOLOGY_KINDS}
    lca = {k: np.zeros((len(layers), tree.depth.max() + 1)) for k in ONTOLOGY_KINDS}
    for i, layer in enumerate(progress(layers, desc=f"ontology of {run.name}", unit="layer")):
        raw = run.read_acts(layer, slice(None)).numpy()
        xs = {"sae": run.dense_codes(layer, opts.codes or "relu", device=opts.torch_device).cpu().numpy(),
              "raw": np.concatenate([raw, -raw], axis=1),
              "null": null.dense_codes(layer, opts.codes or "relu", device=opts.torch_device).cpu().numpy()}
        for kind, x in xs.items():
            best[kind][i], lca[kind][i] = layer_scores(x, holds_NH, tree, opts.top_samples, kind != "raw")
    scorable = ~np.isnan(best["sae"])
    coverage = {k: (np.nan_to_num(v) >= opts.threshold).sum(1) / np.maximum(scorable.sum(1), 1)
                for k, v in best.items()}
    mean_depth = {k: v @ np.arange(v.shape[1]) for k, v in lca.items()}
    return OntologyResults(run.name, null.name, opts.codes or "relu", opts.threshold, opts.top_samples, layers,
                           tree.nodes, tree.depth.tolist(), best, lca, coverage, mean_depth, opts.label_column,
                           opts.hierarchy)


@dataclass(kw_only=True)
class OntologyArgs(OutputOptions, AnalysisOptions):
    run: str
    hierarchy: str | None = None
    """A JSON hierarchy of the labels (default: the built-in one of shapes)."""
    label_column: str | None = None
    """Hub or local datasets: the column whose values are the hierarchy's leaves."""
    null: str = "permute"
    """The coverage baseline: permute (this run's samples shuffled against their labels) or the name of a
    run over the same samples, whose coverage is the floor."""
    threshold: float = 0.9
    """A node is detected by a feature whose AUROC for it is at least this."""
    top_samples: int = 16
    """The samples whose labels' LCA is taken, per feature."""
    layers: list[int] | None = None
    """Layers to score (default: all of the run's)."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("top_samples", self.top_samples)
        if not 0.5 < self.threshold <= 1:
            raise UserError(f"--threshold must be in (0.5, 1], got {self.threshold}")


def open_null(run: Run, spec: str) -> Run:
    if spec == "permute":
        return run.permuted()
    null = Run.open(run.path.parent, spec)
    check_comparable([run, null])
    if null.layers != run.layers:
        raise UserError(f"--null {spec!r} has layers {null.layers}, {run.name!r} has {run.layers}")
    return null


def _plot(res: OntologyResults, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind in ONTOLOGY_KINDS:
        axes[0].plot(res.layers, res.coverage[kind], marker="o", label=kind)
        axes[1].plot(res.layers, res.mean_lca_depth[kind], marker="o", label=kind)
    axes[0].set_ylabel(f"share of nodes detected (AUROC >= {res.threshold})")
    axes[1].set_ylabel(f"mean LCA depth of top {res.top_samples} samples")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.legend(fontsize=8)
    fig.suptitle(f"ontology of {res.run} (null: {res.null})")
    save(fig, path, 130)


@cli
def main(argv=None):
    args = parse(OntologyArgs, argv, "Ontology coverage and LCA depth of SAE features against raw neurons")
    run = Run.open(args.root, args.run)
    tree, holds_NH = load_hierarchy(args.hierarchy, run, args.label_column)
    res = ontology(run, open_null(run, args.null), tree, holds_NH, args)
    scorable = int((~np.isnan(res.best_auroc["sae"][0])).sum())
    print(format_layer_table(f"share of the {scorable} hierarchy nodes held by some samples but not all that some "
                             f"feature detects (AUROC >= {args.threshold}):", res.layers, res.coverage))
    print(format_layer_table(f"mean depth of the LCA of each feature's top {args.top_samples} samples' labels:",
                             res.layers, res.mean_lca_depth))
    args.write(res, lambda path: _plot(res, path))


if __name__ == "__main__":
    main()
