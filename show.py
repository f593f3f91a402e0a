"""Feature previews (SPEC §8): what makes a feature fire? For each feature of one layer of a run, a 3x3
grid of the 9 samples that activate it most, and a static HTML gallery to browse them (gallery.py).

    uv run show.py --run eff                      # last layer -> imgs/eff/feat<i>_<mass>.jpg + index.html
    uv run show.py --run minilm --layer 2 --features 12 40
    uv run show.py --from_json shared.json        # a comp_sharedness.py --json output -> imgs/shared/

Grids are named feat<i>_<mass>.jpg: feature id and activation mass S_i = sum_n f_i(n) with 4
significant digits and no exponent (feat12_345.6.jpg, feat7_12350.jpg). Tiles are the dataset's images
(whatever the run's modality), letterboxed to a square, each with its sample id and activation; a text
run's tiles also show the caption the model read. A feature is 0 on a grey tile.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

import data
from correlation import DEFAULT_CHUNK, open_runs
from errors import ArgumentParser, UserError, cli, resolve_device
from gallery import Card, Group, fmt, write_index
from runs import CODES, DEFAULT_ROOT, Run

TOP = 9
"""Samples per grid (3x3)."""
MIN_ACTIVE = 16
MAX_FEATURES = 64
TILE = 224
"""Side of a sample's image in a grid, pixels."""
PAD, INFO_H, LINE_H, CAPTION_LINES, FONT_SIZE = 3, 20, 16, 4, 13
"""Tile = PAD + image + sample id/activation line (INFO_H) + caption lines (text runs) + PAD."""
INK, MUTED, BLANK, BACKGROUND = (29, 35, 48), (96, 106, 128), (206, 211, 219), (236, 238, 242)
"""Colours: text, sample ids, a tile without an active sample, grid and letterbox background."""


class FeatureStats(NamedTuple):
    mass_F: np.ndarray
    """[F] float64: activation mass S_i = sum_n f_i(n)."""
    n_active_F: np.ndarray
    """[F] int64: samples with f_i(n) > 0."""
    top_val_KF: np.ndarray
    """[K, F] float32: the K largest activations of each feature, best first (K = min(k, N))."""
    top_idx_KF: np.ndarray
    """[K, F] int64: their sample ids."""


def feature_stats(run: Run, layer: int, codes: str = "relu", k: int = TOP, chunk_size: int = DEFAULT_CHUNK,
                  device: str | torch.device = "cpu", progress: bool = True) -> FeatureStats:
    """Mass, active count and top-k samples of every feature of a layer in one pass over the samples:
    each chunk's codes are merged into a running top-k, so memory is [k + chunk, F], never [N, F]."""
    if codes not in CODES:
        raise UserError(f"unknown --codes {codes!r}; choose from {', '.join(CODES)}")
    if chunk_size < 1:
        raise UserError(f"--chunk_size must be positive, got {chunk_size}")
    layer = run.resolve_layer(layer)
    n_features = run.n_features(layer)
    mass_F = torch.zeros(n_features, dtype=torch.float64, device=device)
    n_active_F = torch.zeros(n_features, dtype=torch.int64, device=device)
    # -inf / -1 placeholders sort last and are cut below when N < k
    top_val_KF = torch.full((k, n_features), -torch.inf, device=device)
    top_idx_KF = torch.full((k, n_features), -1, dtype=torch.int64, device=device)
    for start in tqdm(range(0, run.n_samples, chunk_size), desc=f"{run.name} layer {layer} ({codes})", unit="chunk",
                      disable=None if progress else True, leave=False):
        codes_nF = run.dense_codes(layer, codes, slice(start, start + chunk_size), device)
        mass_F += codes_nF.sum(0, dtype=torch.float64)
        n_active_F += (codes_nF > 0).sum(0)
        top_val_KF, pos_KF = torch.cat([top_val_KF, codes_nF]).topk(k, dim=0)
        top_idx_KF = torch.where(pos_KF < k, top_idx_KF.gather(0, pos_KF.clamp(max=k - 1)), pos_KF - k + start)
    keep = min(k, run.n_samples)
    return FeatureStats(mass_F.cpu().numpy(), n_active_F.cpu().numpy(),
                        top_val_KF[:keep].cpu().numpy(), top_idx_KF[:keep].cpu().numpy())


def select_features(stats: FeatureStats, min_active: int = MIN_ACTIVE, max_features: int = MAX_FEATURES) -> list[int]:
    """Features active on at least `min_active` samples, largest activation mass first; the first
    `max_features` of them (0 = all), so that a big layer does not write thousands of files by accident."""
    eligible = np.flatnonzero(stats.n_active_F >= min_active)
    order = eligible[np.argsort(-stats.mass_F[eligible], kind="stable")]
    return [int(f) for f in (order[:max_features] if max_features else order)]


def grid_name(feature: int, mass: float) -> str:
    mass_str = np.format_float_positional(mass, precision=4, unique=False, fractional=False, trim="-")
    return f"feat{feature}_{mass_str}.jpg"


# ---- grids ------------------------------------------------------------------------------------------------
def tile_size(captions: bool) -> tuple[int, int]:
    """(width, height) of one of the 9 tiles of a grid; the grid is 3 times both."""
    return TILE + 2 * PAD, PAD + TILE + INFO_H + (CAPTION_LINES * LINE_H if captions else 0) + PAD


def fit_tile(img: Image.Image) -> Image.Image:
    """The image letterboxed into a TILE x TILE square: nothing of it is cropped away."""
    return ImageOps.pad(img.convert("RGB"), (TILE, TILE), Image.Resampling.BICUBIC, color=BACKGROUND)


@functools.cache
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last line ends with "..." when text is left over."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


class Samples:
    """The dataset of a run, re-created from run.json, with its image tiles cached (a sample often
    appears in several grids)."""

    def __init__(self, run: Run):
        try:
            self.ds = data.from_description(run.meta["dataset"])
        except UserError as e:
            raise UserError(f"run {run.name!r}: cannot re-create its dataset to show its samples: {e}") from None
        self.captions = run.meta.get("modality") == "text"
        """A text run's tiles show the caption it read."""
        self.tile = functools.lru_cache(maxsize=256)(lambda n: fit_tile(self.ds.image(n)))

    def render_grid(self, top_val_K: np.ndarray, top_idx_K: np.ndarray) -> Image.Image:
        """3x3 tiles, row by row, best first; grey where there is no sample with a positive activation."""
        w, h = tile_size(self.captions)
        grid = Image.new("RGB", (3 * w, 3 * h), BACKGROUND)
        draw, font = ImageDraw.Draw(grid), _font()
        for pos in range(TOP):
            x, y = (pos % 3) * w + PAD, (pos // 3) * h + PAD
            if pos >= len(top_idx_K) or not top_val_K[pos] > 0:
                draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), fill=BLANK)
                continue
            n = int(top_idx_K[pos])
            grid.paste(self.tile(n), (x, y))
            draw.text((x + 2, y + TILE + 3), f"#{n}", fill=MUTED, font=font)
            draw.text((x + TILE - 2, y + TILE + 3), fmt(float(top_val_K[pos])), fill=INK, font=font, anchor="ra")
            if self.captions:
                for i, line in enumerate(wrap(self.ds.caption(n), font, TILE - 4, CAPTION_LINES)):
                    draw.text((x + 2, y + TILE + INFO_H + i * LINE_H), line, fill=INK, font=font)
        return grid

    def card(self, out: Path, rel_dir: str, feature: int, stats: FeatureStats, title: str,
             chips: Sequence[tuple[str, str]] = (), tone: str = "") -> Card:
        """Write the feature's grid under out/rel_dir (once) and describe its card."""
        rel = rel_dir + grid_name(feature, float(stats.mass_F[feature]))
        val_K, idx_K = stats.top_val_KF[:, feature], stats.top_idx_KF[:, feature]
        if not (out / rel).exists():
            self.render_grid(val_K, idx_K).save(out / rel, quality=90)
        w, h = tile_size(self.captions)
        top = [(int(n), float(v), self.ds.caption(int(n))) for v, n in zip(val_K, idx_K) if v > 0]
        return Card(title, feature, rel, (3 * w, 3 * h), float(stats.mass_F[feature]), int(stats.n_active_F[feature]),
                    len(self.ds), top, tuple(chips), tone)


# ---- output folder ----------------------------------------------------------------------------------------
def check_out(out: Path, overwrite: bool) -> None:
    """An existing gallery is replaced only with --overwrite, and a folder that is not a gallery never."""
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it, or --out to write elsewhere")
        if not out.is_dir() or (any(out.iterdir()) and not (out / "index.html").is_file()):
            raise UserError(f"{out} exists and is not a gallery folder (no index.html): not replacing it")


@contextmanager
def staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """Build the gallery in a hidden sibling folder and swap it into place at the end: an interrupted
    command leaves the previous gallery intact and no half-written one."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_out(out, overwrite)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dataset_label(run: Run) -> str:
    d = run.meta["dataset"]
    return f"{d.get('name')} ({d.get('split')}, {d.get('n_samples')} samples)"


# ---- the two modes ----------------------------------------------------------------------------------------
def show_run(args: argparse.Namespace) -> None:
    run = Run.open(args.root, args.run)
    layer = run.resolve_layer(args.layer)
    n_features = run.n_features(layer)
    bad = [f for f in args.features or () if not 0 <= f < n_features]
    if bad:
        raise UserError(f"--features {' '.join(map(str, bad))}: layer {layer} of run {run.name!r} has features "
                        f"0..{n_features - 1}")
    out = Path(args.out or Path("imgs") / run.name)
    check_out(out, args.overwrite)
    samples = Samples(run)
    codes = args.codes or "relu"
    stats = feature_stats(run, layer, codes, chunk_size=args.chunk_size, device=resolve_device(args.device))
    n_eligible = int((stats.n_active_F >= args.min_active).sum())
    if args.features:
        feats = sorted(set(args.features), key=lambda f: (-stats.mass_F[f], f))
        rare = [f for f in feats if stats.n_active_F[f] < args.min_active]
        if rare:
            print(f"note: shown because asked for, though active on fewer than {args.min_active} samples: "
                  + ", ".join(f"{f} ({stats.n_active_F[f]})" for f in rare), file=sys.stderr)
        shown = f"{len(feats)} asked for"
    else:
        feats = select_features(stats, args.min_active, args.max_features)
        shown = (f"{len(feats)} of the {n_eligible} active on >= {args.min_active} samples, largest mass first"
                 if len(feats) < n_eligible else f"all {n_eligible} active on >= {args.min_active} samples")
    info = run.meta.get("layer_info", {}).get(str(layer), {})
    fvu = f", FVU {info['fvu']:.3g}" if "fvu" in info else ""
    meta = [("model", f"{run.meta.get('model')} ({run.meta.get('modality')})"),
            ("checkpoint", str(run.meta.get("checkpoint"))), ("layer", f"{layer} (token {run.meta.get('token')})"),
            ("dataset", _dataset_label(run)), ("SAE", f"{n_features} features, top-k {run.top_k}{fvu}"),
            ("codes", codes), ("shown", shown)]
    with staged(out, args.overwrite) as tmp:
        cards = [samples.card(tmp, "", f, stats, f"feature {f}")
                 for f in tqdm(feats, desc="grids", unit="feature", disable=None, leave=False)]
        write_index(tmp / "index.html", f"{run.name} · layer {layer}", meta, cards,
                    [("mass", "activation mass"), ("active", "active samples"), ("feature", "feature id")])
    print(f"wrote {len(cards)} grids and {out / 'index.html'} (layer {layer} of {run.name!r}: {shown})")


def load_sharedness(path: str) -> dict:
    """A comp_sharedness.py --json output, checked: {"source", "min_group", "max_group", "features":
    [{"feature", "delta", "rho": {run: r}, "match": {run: j}}]}; optional "layers" {run: layer}, "codes"."""
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--from_json {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"--from_json {path}: not JSON ({e})") from None
    try:
        others = [*obj["min_group"], *obj["max_group"]]
        for f in obj["features"]:
            int(f["feature"]), float(f["delta"])
            for r in others:
                int(f["match"][r]), float(f["rho"][r])
        if not isinstance(obj["source"], str) or not isinstance(obj.get("layers", {}), dict):
            raise TypeError('"source" must be a run name and "layers" an object {run: layer}')
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--from_json {path} is not a comp_sharedness.py --json output "
                        f"({type(e).__name__}: {e})") from None
    return obj


def show_json(args: argparse.Namespace) -> None:
    res = load_sharedness(args.from_json)
    feats = res["features"][:args.max_features or None]
    runs = open_runs(args.root, [res["source"], *res["min_group"], *res["max_group"]])
    source, others = runs[0], runs[1:]
    layers = {r.name: r.resolve_layer(int(res.get("layers", {}).get(r.name, -1))) for r in runs}
    wanted = {source.name: [int(f["feature"]) for f in feats],
              **{r.name: [int(f["match"][r.name]) for f in feats] for r in others}}
    for r in runs:
        n = r.n_features(layers[r.name])
        bad = sorted({j for j in wanted[r.name] if not 0 <= j < n})
        if bad:
            raise UserError(f"--from_json {args.from_json} names features {bad} of run {r.name!r}, whose layer "
                            f"{layers[r.name]} has features 0..{n - 1}: was the run trained again since?")
    out = Path(args.out or Path("imgs") / Path(args.from_json).stem)
    check_out(out, args.overwrite)
    codes = args.codes or res.get("codes") or "relu"
    samples = {r.name: Samples(r) for r in runs}
    device = resolve_device(args.device)
    stats = {r.name: feature_stats(r, layers[r.name], codes, chunk_size=args.chunk_size, device=device) for r in runs}
    group_of = {**{n: "G" for n in res["min_group"]}, **{n: "H" for n in res["max_group"]}}
    with staged(out, args.overwrite) as tmp:
        for r in runs:
            (tmp / r.name).mkdir(exist_ok=True)
        groups = []
        for f in tqdm(feats, desc="grids", unit="feature", disable=None, leave=False):
            i, delta = int(f["feature"]), float(f["delta"])
            cards = [samples[source.name].card(tmp, f"{source.name}/", i, stats[source.name], f"{source.name} #{i}",
                                               [("group", "M")], "source")]
            for r in others:
                j, rho, group = int(f["match"][r.name]), float(f["rho"][r.name]), group_of[r.name]
                cards.append(samples[r.name].card(tmp, f"{r.name}/", j, stats[r.name], f"{r.name} #{j}",
                                                  [("rho", f"{rho:+.3f}"), ("group", group)], group))
            mass = float(stats[source.name].mass_F[i])
            groups.append(Group(f"{source.name} feature {i}", i, [("Δ", fmt(delta)), ("mass", fmt(mass))],
                                {"delta": delta, "mass": mass}, cards))
        with_layers = {k: ", ".join(f"{n} (layer {layers[n]})" for n in names)
                       for k, names in (("M", [source.name]), ("G", res["min_group"]), ("H", res["max_group"]))}
        meta = [("source M", with_layers["M"]), ("G: shared with all of", with_layers["G"]),
                ("H: shared with none of", with_layers["H"]), ("dataset", _dataset_label(source)),
                ("codes", codes), ("shown", f"{len(groups)} of {len(res['features'])} features of the JSON")]
        write_index(tmp / "index.html", f"Comparative Sharedness · {source.name}", meta, groups,
                    [("delta", "Δ"), ("mass", "activation mass"), ("feature", "feature id")])
    print(f"wrote {len(groups)} feature groups and {out / 'index.html'}")


@cli
def main(argv=None):
    p = ArgumentParser(description="Feature previews: top-9 grids and an HTML gallery (SPEC §8)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="run whose features are shown")
    what.add_argument("--from_json", help="a comp_sharedness.py --json output: each source feature beside its "
                                          "best match in every run of G and H")
    p.add_argument("--layer", type=int, help="layer of --run (default: the last recorded; -1 = last)")
    p.add_argument("--features", type=int, nargs="+", metavar="ID",
                   help="show only these features of --run (shown even if active on fewer than --min_active samples)")
    p.add_argument("--min_active", type=int, default=MIN_ACTIVE,
                   help="skip features active on fewer samples (default: %(default)s)")
    p.add_argument("--max_features", type=int, default=MAX_FEATURES,
                   help="show at most this many features, largest activation mass first; with --from_json, the "
                        "first of the JSON (default: %(default)s; 0 = all)")
    p.add_argument("--out", help="output folder (default: imgs/<run>, or imgs/<json file stem> with --from_json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing gallery in --out")
    p.add_argument("--root", default=DEFAULT_ROOT, help="folder holding the runs (default: %(default)s)")
    p.add_argument("--codes", choices=CODES, help="relu (default; with --from_json: the JSON's codes) or topk")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK, help="samples per chunk (default: %(default)s)")
    args = p.parse_args(argv)
    if args.min_active < 0 or args.max_features < 0:
        raise UserError("--min_active and --max_features must be >= 0")
    if args.from_json and (args.layer is not None or args.features):
        raise UserError("--layer and --features go with --run; the JSON of --from_json fixes layers and features")
    if args.layer is None:
        args.layer = -1
    (show_run if args.run else show_json)(args)


if __name__ == "__main__":
    main()
