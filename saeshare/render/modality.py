"""An MLLM's modality shares (train_mllm.py): which tokens each layer's SAE features fire on, as the command's
table, a figure against layer, and the study report's section."""
from __future__ import annotations

from pathlib import Path

from saeshare.disk.runs import ModalityShares, RunMeta
from saeshare.render.figures import pyplot, save
from saeshare.render.sections import Heading, Images, Section, Table, Text

SHARES = {"image_only": "image only", "text_only": "text only", "both": "both"}
HEAD = ["layer", *SHARES.values(), "features", "image mass"]


def share_rows(shares: dict[int, ModalityShares]) -> list[list[str]]:
    return [[str(layer), *(f"{getattr(s, key):.3f}" for key in SHARES), str(s.n_features), f"{s.image_mass:.3f}"]
            for layer, s in shares.items()]


def format_shares(shares: dict[int, ModalityShares]) -> str:
    """The command's table, one line per layer."""
    rows = [HEAD, *share_rows(shares)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    return "\n".join(" ".join(f"{c:>{w}}" for c, w in zip(r, widths)) for r in rows)


def plot_shares(shares: dict[int, ModalityShares], path: str | Path, title: str) -> None:
    plt = pyplot()
    layers = list(shares)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, label in SHARES.items():
        ax.plot(layers, [getattr(shares[la], key) for la in layers], marker="o", label=label)
    ax.set(xlabel="layer", ylabel="share of firing features", ylim=(0, 1), title=title, xticks=layers)
    ax.legend(frameon=False)
    save(fig, path, 120)


def mllm_pairs(runs: dict[str, RunMeta]) -> dict[str, tuple[str, str]]:
    """The MLLM pairs among a study's runs: its name -> (image run, text run)."""
    out = {}
    for name, meta in runs.items():
        base = name.removesuffix("_image")
        if meta.modality_shares is not None and meta.modality == "image" and f"{base}_text" in runs:
            out[base] = (name, f"{base}_text")
    return out


def mllm_sections(runs: dict[str, RunMeta], wmppc: dict, out: Path) -> list[Section]:
    """Per MLLM of a study: its modality shares beside the wMPPC of each layer's image rows to its caption rows
    (the same layer's SAE read through both modalities), and the shares' figure, written under out."""
    sections: list[Section] = []
    for base, (image, text) in mllm_pairs(runs).items():
        shares, w = runs[image].modality_shares, wmppc.get(f"{image}->{text}")
        rows = share_rows(shares)
        if w is not None:
            at = {(s, t): w.layer_matrix[i, j] for i, s in enumerate(w.source_layers)
                  for j, t in enumerate(w.target_layers)}
            rows = [[*r, f"{at[layer, layer]:.3f}"] for r, layer in zip(rows, shares)]
        figure = f"modality_{base}.png"
        plot_shares(shares, out / figure, f"{base}: where its SAE features fire")
        first = next(iter(shares.values()))
        sections += [
            Heading(f"MLLM {base}: image tokens and caption tokens"),
            Text(f"Each layer's SAE features by the tokens they fire on (at least {first.min_fires} times, over "
                 f"the first {first.n_samples} samples); image mass: the share of all activation on image tokens; "
                 f"wMPPC {image} -> {text} at the same layer: how far the SAE features of the image rows are "
                 "found in the caption rows."),
            Table([*HEAD, *(["wMPPC image -> text"] if w is not None else [])], rows),
            Images([(figure, figure)])]
    return sections
