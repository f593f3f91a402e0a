"""What the demo's and a study's reports share: every ordered pair's calibrated scores, as a table and
a figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from saeshare.disk.results import MEASURES, Scores, Similarity, Wmppc
from saeshare.render.figures import pyplot, save
from saeshare.render.sections import Section, Table, Text

CALIBRATION = ("wMPPC as the paper computes it, then corrected for its small-sample bias with its 95% interval "
               "(delete-one-block jackknife, 10 random blocks of samples), its floor (B's samples permuted: "
               "chance) and its ceiling (A's SAE seed 0 against seed 1: what SAE randomness alone allows); beside it "
               "the classic measures on the last layers' pooled activations, each with its permutation floor "
               "(their ceiling is 1).")

CAL_HEAD = ["pair (A -> B)", "wMPPC all layers, corrected [95% CI]", "floor", "ceiling",
            "wMPPC last layer, corrected [95% CI]",
            *(f"{m} (floor)" for m in MEASURES)]


def _row(pair: str, wmppc: dict[str, Wmppc], similarity: dict[str, Similarity]) -> list[str]:
    w, sim = wmppc[pair], similarity.get(pair)

    def score(key: str) -> str:
        if w.ci is None:
            return f"{getattr(w, key):.3f}"
        lo, hi = getattr(w.ci, key)
        return f"{getattr(w, key):.3f}, {getattr(w.corrected, key):.3f} [{lo:.3f}, {hi:.3f}]"

    def ref(scores: Scores | None) -> str:
        return "–" if scores is None else f"{(scores.corrected or scores).all_layers:.3f}"
    return [pair, score("all_layers"), ref(w.floor), ref(w.ceiling), score("last_layer"),
            *(f"{sim.measures[m].last_layer:.3f} ({sim.floor[m]:.3f})" if sim else "–" for m in MEASURES)]


def calibration_sections(wmppc: dict[str, Wmppc], similarity: dict[str, Similarity]) -> list[Section]:
    """How to read the table, and the table: every ordered pair's scores with their floors and ceilings."""
    return [Text(CALIBRATION), Table(CAL_HEAD, [_row(pair, wmppc, similarity) for pair in wmppc])]


def calibration_figure(pairs: dict[str, Wmppc], similarities: dict[str, Similarity], path: Path) -> None:
    """One panel per score: each pair's score as a point (wMPPC with its interval), its floor and
    ceiling as marks."""
    plt = pyplot()
    names = list(pairs)
    # with the jackknife: corrected scores, floors and ceilings, the interval around the corrected score
    def value(s: Scores | Wmppc | None) -> float:
        return np.nan if s is None else (s.corrected or s).all_layers

    corrected = all(pairs[p].corrected is not None for p in names)
    panels = [(f"wMPPC (all layers{', corrected' if corrected else ''})", [value(pairs[p]) for p in names],
               [value(pairs[p].floor) for p in names], [value(pairs[p].ceiling) for p in names],
               [pairs[p].ci.all_layers for p in names] if all(pairs[p].ci for p in names) else None)]
    panels += [(f"{m} (last layer)", [similarities[p].measures[m].last_layer for p in names],
                [similarities[p].floor[m] for p in names], [similarities[p].ceiling[m] for p in names], None)
               for m in MEASURES if similarities]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 0.45 * len(names) + 1.6), sharey=True,
                             squeeze=False)
    axes = axes[0]
    y = np.arange(len(names))
    for ax, (title, score, floor, ceiling, ci) in zip(axes, panels):
        if ci is not None:
            lo, hi = np.array(ci).T
            ax.errorbar(score, y, xerr=[np.array(score) - lo, hi - np.array(score)], fmt="none", ecolor="#3b6fd8")
        ax.scatter(floor, y, marker="|", s=160, color="#c0392b", label="floor")
        ax.scatter(ceiling, y, marker="|", s=160, color="#27ae60", label="ceiling")
        ax.scatter(score, y, color="#1d2330", zorder=3, label="score")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(min(0.0, np.nanmin(floor) - 0.05), 1.05)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right", fontsize=8)
    save(fig, path, 130)
