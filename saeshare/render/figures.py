"""Tables and figures shared by the analysis commands."""
from __future__ import annotations

from pathlib import Path

import numpy as np

FONT_SIZES = {"font.size": 13, "axes.titlesize": 14, "axes.labelsize": 13, "xtick.labelsize": 12,
              "ytick.labelsize": 12, "legend.fontsize": 12}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use; text sized
    for figures that a report page shows at half their pixel width or less."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(FONT_SIZES)
    return plt


def save(fig, path: str | Path, dpi: int = 130) -> None:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def format_layer_table(title: str, layers: list[int], columns: dict[str, list[float]]) -> str:
    """One row per layer, one column per name (3 decimals)."""
    width = max(9, *(len(c) + 2 for c in columns))
    lines = [title, "layer" + "".join(f"{c:>{width}}" for c in columns)]
    lines += [f"{layer:>5}" + "".join(f"{v[i]:>{width}.3f}" for v in columns.values())
              for i, layer in enumerate(layers)]
    return "\n".join(lines)


def format_table(title: str, names: list[str], values: np.ndarray) -> str:
    width = max(8, *(len(n) for n in names))
    lines = [title, " " * width + "".join(f" {n:>{width}}" for n in names)]
    for name, row in zip(names, values):
        lines.append(f"{name:>{width}}" + "".join(f" {'-' if np.isnan(v) else f'{v:.4f}':>{width}}" for v in row))
    return "\n".join(lines)


def plot_heatmap(values: np.ndarray, rows: list[str], cols: list[str], ylabel: str, xlabel: str,
                 title: str, path: str | Path, label: str = "wMPPC") -> None:
    """values [rows, cols] as a heatmap PNG (NaN cells left blank), annotated when small enough to read."""
    plt = pyplot()
    h, w = values.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * w + 2), max(3.0, 0.45 * h + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=min(0.0, float(np.nanmin(values))),
                   vmax=1.0, aspect="auto")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xticks(range(w), cols, rotation=45 if w > 8 else 0, ha="right" if w > 8 else "center")
    ax.set_yticks(range(h), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if h * w <= 400:
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7 if h * w > 100 else 9,
                        color="black" if v > 0.6 else "white")
    save(fig, path, 150)
