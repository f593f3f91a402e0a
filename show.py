"""Feature previews (docs/design.md#previews): what makes a feature fire? For each feature of one layer of a run, a 3x3
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

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

import data
from errors import UserError, check_at_least, cli
from saeshare.core.options import parse
from saeshare.core.progress import progress
from saeshare.core.streaming import merge_top
from saeshare.disk.files import staged_dir
from saeshare.disk.results import SharedFeature, SharednessReport
from saeshare.disk.runs import DEFAULT_CHUNK, Run, check_codes, open_runs, warn_run
from saeshare.engine.options import AnalysisOptions
from saeshare.render.gallery import Card, Group, fmt, write_index
from saeshare.render.heatmaps import CaptionMaps, TokenMaps, overlay, sample_maps

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
WORD_HEAT = (250, 150, 40)
"""Shade behind a caption's word where the feature is at its largest on the grid (background where 0)."""


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
                  device: str | torch.device = "cpu", show_progress: bool = True) -> FeatureStats:
    """Mass, active count and top-k samples of every feature of a layer in one pass over the samples:
    each chunk's codes are merged into a running top-k, so memory is [k + chunk, F], never [N, F]."""
    check_codes(codes)
    layer = run.resolve_layer(layer)
    n_features = run.n_features(layer)
    mass_F = torch.zeros(n_features, dtype=torch.float64, device=device)
    n_active_F = torch.zeros(n_features, dtype=torch.int64, device=device)
    # -inf / -1 placeholders sort last and are cut below when N < k
    top_val_KF = torch.full((k, n_features), -torch.inf, device=device)
    top_idx_KF = torch.full((k, n_features), -1, dtype=torch.int64, device=device)
    for start in progress(range(0, run.n_samples, chunk_size), desc=f"{run.name} layer {layer} ({codes})",
                          unit="chunk", disable=not show_progress, leave=False):
        codes_nF = run.dense_codes(layer, codes, slice(start, start + chunk_size), device)
        mass_F += codes_nF.sum(0, dtype=torch.float64)
        n_active_F += (codes_nF > 0).sum(0)
        top_val_KF, top_idx_KF = merge_top(top_val_KF, top_idx_KF, codes_nF, start)
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
    """DejaVu Sans, which matplotlib ships: captions in Greek, Cyrillic, accented Latin and many symbols draw
    as letters, not boxes (Pillow's default font covers little beyond ASCII)."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), FONT_SIZE)


def clip(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """`text`, or its end after "..." when it is wider than `width` pixels (a file name's end says most)."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength("..." + text) > width:
        text = text[1:]
    return "..." + text


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


def draw_caption(draw: ImageDraw.ImageDraw, xy: tuple[int, int], caption: str, font: ImageFont.FreeTypeFont,
                 heat_W: np.ndarray | None = None, scale: float = 0.0) -> None:
    """The caption wrapped under its tile; with `heat_W` (a value per word), each word shaded by it over
    `scale` (the largest on the grid, so the tiles of a feature compare)."""
    x0, y0 = xy
    heat = iter(heat_W if heat_W is not None and scale > 0 else ())
    for i, line in enumerate(wrap(caption, font, TILE - 4, CAPTION_LINES)):
        y, x = y0 + i * LINE_H, x0
        for word in line.split(" "):
            level = min(max(float(next(heat, 0.0)) / scale, 0.0), 1.0) if scale > 0 else 0.0
            width = font.getlength(word)
            if level > 0:
                shade = tuple(round(b + (h - b) * level) for b, h in zip(BACKGROUND, WORD_HEAT))
                draw.rectangle((x - 1, y, x + width + 1, y + LINE_H - 2), fill=shade)
            x += width + font.getlength(" ")
        draw.text((x0, y), line, fill=INK, font=font)


class Samples:
    """The dataset of a run, re-created from run.json, with its image tiles cached (a sample often
    appears in several grids)."""

    def __init__(self, run: Run):
        try:
            self.ds = data.from_description(run.meta.dataset)
        except UserError as e:
            raise UserError(f"run {run.name!r}: cannot re-create its dataset to show its samples: {e}") from None
        self.captions = run.meta.modality == "text"
        """A text run's tiles show the caption it read."""
        self.tile = functools.lru_cache(maxsize=256)(lambda n: fit_tile(self.ds.image(n)))
        self.maps: TokenMaps | CaptionMaps | None = None
        """With --heatmaps: where in each sample the feature fires, laid on its image or its caption's words."""

    def render_grid(self, top_val_K: np.ndarray, top_idx_K: np.ndarray, feature: int | None = None) -> Image.Image:
        """3x3 tiles, row by row, best first; grey where there is no sample with a positive activation; with
        heatmaps (and `feature`), each tile shows where the feature fires."""
        w, h = tile_size(self.captions)
        shown = [int(top_idx_K[p]) for p in range(min(TOP, len(top_idx_K))) if top_val_K[p] > 0]
        heats = {n: self.maps.heat(n, feature) for n in shown} if self.maps is not None and feature is not None else {}
        scale = max((float(h.max(initial=0.0)) for h in heats.values()), default=0.0)
        tiles = {n: overlay(self.tile(n), heats[n], self.ds.image(n).size, scale)
                 if isinstance(self.maps, TokenMaps) else self.tile(n) for n in shown}
        grid = Image.new("RGB", (3 * w, 3 * h), BACKGROUND)
        draw, font = ImageDraw.Draw(grid), _font()
        for pos in range(TOP):
            x, y = (pos % 3) * w + PAD, (pos // 3) * h + PAD
            if pos >= len(top_idx_K) or not top_val_K[pos] > 0:
                draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), fill=BLANK)
                continue
            n = int(top_idx_K[pos])
            grid.paste(tiles[n], (x, y))
            value = fmt(float(top_val_K[pos]))
            name = clip(self.ds.short_name(n), font, TILE - 10 - font.getlength(value))
            draw.text((x + 2, y + TILE + 3), name, fill=MUTED, font=font)
            draw.text((x + TILE - 2, y + TILE + 3), value, fill=INK, font=font, anchor="ra")
            if self.captions:
                draw_caption(draw, (x + 2, y + TILE + INFO_H), self.ds.caption(n), font, heats.get(n), scale)
        return grid

    def card(self, out: Path, rel_dir: str, feature: int, stats: FeatureStats, title: str,
             chips: Sequence[tuple[str, str]] = (), tone: str = "") -> Card:
        """Write the feature's grid under out/rel_dir (once) and describe its card."""
        rel = rel_dir + grid_name(feature, float(stats.mass_F[feature]))
        val_K, idx_K = stats.top_val_KF[:, feature], stats.top_idx_KF[:, feature]
        if not (out / rel).exists():
            self.render_grid(val_K, idx_K, feature).save(out / rel, quality=90)
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


def _dataset_label(run: Run) -> str:
    d = run.meta.dataset
    return f"{d.name} ({d.split}, {d.n_samples} samples)"


# ---- the two galleries ------------------------------------------------------------------------------------
@dataclass
class GalleryOptions(AnalysisOptions):
    """How a gallery is made (what it shows is a run, or a Comparative Sharedness output)."""
    layer: int | None = None
    """Layer of --run (default: the last recorded; -1 = last)."""
    features: list[int] | None = None
    """Show only these features of --run (shown even if active on fewer than --min_active samples)."""
    min_active: int = MIN_ACTIVE
    """Skip features active on fewer samples."""
    max_features: int = MAX_FEATURES
    """Show at most this many features, largest activation mass first; with --from_json, the first of the
    JSON (0 = all)."""
    out: str | None = None
    """Output folder (default: imgs/<run>, or imgs/<json file stem> with --from_json)."""
    overwrite: bool = False
    """Replace an existing gallery in --out."""
    heatmaps: bool = False
    """Where the feature fires in each shown sample: shaded on the image (image runs) or on the caption's words
    (text runs); the encoder re-run on the shown samples, every token of the layer through the SAE."""
    labels: bool = False
    """Name each feature (labels.py: the caption term or label it predicts best, by AUROC, or
    "unlabelled" below its permuted floor) on its card."""

    def __post_init__(self):
        super().__post_init__()
        check_at_least("min_active", self.min_active, 0)
        check_at_least("max_features", self.max_features, 0)


class Gallery(NamedTuple):
    index: Path
    """The gallery page."""
    grids: dict[tuple[str, int], Path]
    """(run, feature) -> its grid image."""


def _written(out: Path, cards: Sequence[tuple[str, Card]]) -> Gallery:
    out = out.resolve()
    return Gallery(out / "index.html", {(run, c.feature): out / c.image for run, c in cards})


def _labels(run: Run, layer: int, codes: str, opts: GalleryOptions) -> dict[int, tuple[tuple[str, str], ...]]:
    """Each feature's label chip: its name and AUROC (against its floor)."""
    import labels

    return {f: (("label", f"{lab.label} ({lab.score:.2f}, floor {lab.floor:.2f})"),)
            for f, lab in labels.named(run, layer, codes, opts.torch_device).features.items()}


def run_gallery(run: Run, opts: GalleryOptions) -> Gallery:
    """Grids and page of one layer of a run, in opts.out (default imgs/<run>)."""
    layer = run.resolve_layer(-1 if opts.layer is None else opts.layer)
    n_features = run.n_features(layer)
    bad = [f for f in opts.features or () if not 0 <= f < n_features]
    if bad:
        raise UserError(f"--features {' '.join(map(str, bad))}: layer {layer} of run {run.name!r} has features "
                        f"0..{n_features - 1}")
    out = Path(opts.out or Path("imgs") / run.name)
    check_out(out, opts.overwrite)
    samples = Samples(run)
    codes = opts.codes or "relu"
    stats = feature_stats(run, layer, codes, chunk_size=opts.chunk_size, device=opts.torch_device)
    feats, shown = _chosen(stats, opts)
    info = run.meta.layer_info.get(layer)
    fvu = f", FVU {info.fvu:.3g}" if info is not None and info.fvu is not None else ""
    meta = [("model", f"{run.meta.model} ({run.meta.modality})"), ("checkpoint", run.meta.checkpoint),
            ("layer", f"{layer} (token {run.meta.token})"), ("dataset", _dataset_label(run)),
            ("SAE", f"{n_features} features, top-k {run.top_k}{fvu}"), ("codes", codes), ("shown", shown)]
    names = _labels(run, layer, codes, opts) if opts.labels else {}
    if opts.heatmaps:
        samples.maps = sample_maps(run, layer, opts.torch_device)
    with staged_dir(out, lambda final: check_out(final, opts.overwrite)) as tmp:
        cards = [samples.card(tmp, "", f, stats, f"feature {f}", names.get(f, ()))
                 for f in progress(feats, desc="grids", unit="feature", leave=False)]
        write_index(tmp / "index.html", f"{run.name} · layer {layer}", meta, cards,
                    [("mass", "activation mass"), ("active", "active samples"), ("feature", "feature id")])
    print(f"wrote {len(cards)} grids and {out / 'index.html'} (layer {layer} of {run.name!r}: {shown})")
    return _written(out, [(run.name, c) for c in cards])


def _chosen(stats: FeatureStats, opts: GalleryOptions) -> tuple[list[int], str]:
    """The features to show, and how they were chosen."""
    n_eligible = int((stats.n_active_F >= opts.min_active).sum())
    if opts.features:
        feats = sorted(set(opts.features), key=lambda f: (-stats.mass_F[f], f))
        rare = [f for f in feats if stats.n_active_F[f] < opts.min_active]
        if rare:
            print(f"note: shown because asked for, though active on fewer than {opts.min_active} samples: "
                  + ", ".join(f"{f} ({stats.n_active_F[f]})" for f in rare), file=sys.stderr)
        return feats, f"{len(feats)} asked for"
    feats = select_features(stats, opts.min_active, opts.max_features)
    return feats, (f"{len(feats)} of the {n_eligible} active on >= {opts.min_active} samples, largest mass first"
                   if len(feats) < n_eligible else f"all {n_eligible} active on >= {opts.min_active} samples")


def _check_report_features(feats: list[SharedFeature], runs: list[Run], layers: dict[str, int], what: str) -> None:
    wanted = {runs[0].name: [f.feature for f in feats], **{r.name: [f.match[r.name] for f in feats] for r in runs[1:]}}
    for r in runs:
        n = r.n_features(layers[r.name])
        bad = sorted({j for j in wanted[r.name] if not 0 <= j < n})
        if bad:
            raise UserError(f"{what} names features {bad} of run {r.name!r}, whose layer "
                            f"{layers[r.name]} has features 0..{n - 1}: was the run trained again since?")


def sharedness_gallery(report: SharednessReport, opts: GalleryOptions, what: str = "the sharedness output") -> Gallery:
    """Each selected source feature beside its best match in every run of G and H, in opts.out."""
    feats = report.features[:opts.max_features or None]
    runs = open_runs(opts.root, [report.source, *report.min_group, *report.max_group], verbose=opts.verbose)
    source, others = runs[0], runs[1:]
    layers = {r.name: r.resolve_layer((report.layers or {}).get(r.name, -1)) for r in runs}
    _check_report_features(feats, runs, layers, what)
    out = Path(opts.out)
    check_out(out, opts.overwrite)
    codes = opts.codes or report.codes
    samples = {r.name: Samples(r) for r in runs}
    stats = {r.name: feature_stats(r, layers[r.name], codes, chunk_size=opts.chunk_size, device=opts.torch_device)
             for r in runs}
    names = {r.name: _labels(r, layers[r.name], codes, opts) if opts.labels else {} for r in runs}
    for r in runs:
        if opts.heatmaps:
            samples[r.name].maps = sample_maps(r, layers[r.name], opts.torch_device)
    group_of = {**{n: "G" for n in report.min_group}, **{n: "H" for n in report.max_group}}
    written: list[tuple[str, Card]] = []
    with staged_dir(out, lambda final: check_out(final, opts.overwrite)) as tmp:
        for r in runs:
            (tmp / r.name).mkdir(exist_ok=True)
        groups = []
        for f in progress(feats, desc="grids", unit="feature", leave=False):
            own = samples[source.name].card(tmp, f"{source.name}/", f.feature, stats[source.name],
                                            f"{source.name} #{f.feature}",
                                            [("group", "M"), *names[source.name].get(f.feature, ())], "source")
            cards = [(source.name, own)]
            for r in others:
                j, group = f.match[r.name], group_of[r.name]
                marks = [("rho", f"{f.rho[r.name]:+.3f}"), ("group", group), *names[r.name].get(j, ())]
                cards.append((r.name, samples[r.name].card(tmp, f"{r.name}/", j, stats[r.name], f"{r.name} #{j}",
                                                           marks, group)))
            mass = float(stats[source.name].mass_F[f.feature])
            groups.append(Group(f"{source.name} feature {f.feature}", f.feature,
                                [("Δ", fmt(f.delta)), ("mass", fmt(mass))], {"delta": f.delta, "mass": mass},
                                [c for _, c in cards]))
            written += cards
        with_layers = {k: ", ".join(f"{n} (layer {layers[n]})" for n in names)
                       for k, names in (("M", [source.name]), ("G", report.min_group), ("H", report.max_group))}
        meta = [("source M", with_layers["M"]), ("G: shared with all of", with_layers["G"]),
                ("H: shared with none of", with_layers["H"]), ("dataset", _dataset_label(source)),
                ("codes", codes), ("shown", f"{len(groups)} of {len(report.features)} features of the JSON")]
        write_index(tmp / "index.html", f"Comparative Sharedness · {source.name}", meta, groups,
                    [("delta", "Δ"), ("mass", "activation mass"), ("feature", "feature id")])
    print(f"wrote {len(groups)} feature groups and {out / 'index.html'}")
    return _written(out, written)


@dataclass
class ShowArgs(GalleryOptions):
    run: str | None = None
    """Run whose features are shown."""
    from_json: str | None = None
    """A comp_sharedness.py --json output: each source feature beside its best match in every run of G and H."""

    def __post_init__(self):
        super().__post_init__()
        if (self.run is None) == (self.from_json is None):
            raise UserError("give one of --run RUN or --from_json FILE")
        if self.from_json and (self.layer is not None or self.features):
            raise UserError("--layer and --features go with --run; the JSON of --from_json fixes layers and features")


@cli
def main(argv=None):
    args = parse(ShowArgs, argv, "Feature previews: top-9 grids and an HTML gallery")
    if args.run:
        run = Run.open(args.root, args.run)
        warn_run(run, args.verbose)
        run_gallery(run, args)
    else:
        report = SharednessReport.load(args.from_json, f"--from_json {args.from_json}")
        args.out = args.out or str(Path("imgs") / Path(args.from_json).stem)
        sharedness_gallery(report, args, f"--from_json {args.from_json}")


if __name__ == "__main__":
    main()
