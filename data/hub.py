"""Captioned image datasets read through Hugging Face `datasets`: hub datasets (docs/design.md#datasets) and
local imagefolders with a metadata.jsonl (docs/design.md#datasets). Columns are found from the features, not
hard-coded, so that a dataset with other column names still loads."""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from PIL import Image

from data.base import PairedDataset, fingerprint
from errors import UserError

HUB = {
    "coco": "wangherr/coco2017_train_image_caption",
    "flowers102": "efekankavalci/flowers102-captions",
}
"""--dataset names of hub datasets and their repositories."""
CAPTION_COLUMNS = ("text", "caption", "captions", "sentence", "sentences", "prompt", "description")
"""Caption column candidates, best first; otherwise the first text column that is not an id."""
ID_COLUMNS = ("image_id", "id", "file_name", "filename", "image_file", "img_id", "cocoid", "path")
"""Id-like columns used for sample ids when their values are unique; otherwise the row index."""
OFFLINE_HINT = ("to run offline use --dataset shapes or --dataset /path/to/folder "
                "(images + metadata.jsonl with file_name and text)")


def _is_text(feature) -> bool:
    """A string column, or a list of strings (several captions per image: the first is used)."""
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    inner = getattr(feature, "feature", None)  # List / Sequence / LargeList
    return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")


def find_columns(features) -> tuple[str, str, str | None]:
    """(image column, caption column, id column or None) of a `datasets.Features`."""
    import datasets

    image_cols = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    if not image_cols:
        raise UserError(f"no image column among the dataset's columns {list(features)}")
    by_lower = {c.lower(): c for c in features}
    id_col = next((by_lower[c] for c in ID_COLUMNS if c in by_lower), None)
    text_cols = [c for c, f in features.items() if _is_text(f)]
    preferred = [by_lower[c] for c in CAPTION_COLUMNS if c in by_lower and by_lower[c] in text_cols]
    others = [c for c in text_cols if c.lower() not in ID_COLUMNS]
    caption_col = (preferred or others or [None])[0]
    if caption_col is None:
        raise UserError(f"no caption (text) column among the dataset's columns {list(features)}")
    return image_cols[0], caption_col, id_col


class HFDataset(PairedDataset):
    """A `datasets.Dataset` seen as (image, caption) pairs; captions are read once, images on demand."""

    def __init__(self, ds, name: str, split: str, ids_from_paths_under: Path | None = None):
        import datasets

        self.name, self.split = name, split
        self._ds = ds
        self._image_col, caption_col, id_col = find_columns(ds.features)
        self._captions = [_first(c) for c in ds[caption_col]]
        ids = None
        self.folder: Path | None = None
        """A local folder's path (its samples' ids are file names relative to it), else None."""
        if ids_from_paths_under is not None:  # local folder: the file_name of metadata.jsonl
            refs = ds.cast_column(self._image_col, datasets.Image(decode=False))[self._image_col]
            if all(r.get("path") for r in refs):
                ids = [Path(os.path.relpath(r["path"], ids_from_paths_under)).as_posix() for r in refs]
                self.folder = ids_from_paths_under
                _check_images(ids, name)
        if ids is None and id_col is not None:
            ids = [str(v) for v in ds[id_col]]
        if ids is None or len(set(ids)) != len(ids):
            ids = [str(n) for n in range(len(ds))]
        self.sample_ids = ids

    @cached_property
    def fingerprint(self) -> str:
        """A folder's samples by content (file names, sizes, captions), so that a copy or a moved folder is
        the same dataset; a hub dataset's by name and ids."""
        if self.folder is None:
            return self.path_fingerprint
        sizes = [(self.folder / i).stat().st_size for i in self.sample_ids]
        return fingerprint("folder", self.split, self.sample_ids, sizes=sizes, captions=self._captions)

    @property
    def path_fingerprint(self) -> str:
        """By name, split and ids: a hub dataset's fingerprint, and how runs made before content fingerprints
        named a folder (its path as the name). Not super().fingerprint: a cached_property would store it
        under this one's name."""
        return fingerprint(self.name, self.split, self.sample_ids)

    def image(self, i: int) -> Image.Image:
        try:
            im = self._ds[self._check(i)][self._image_col]
        except (OSError, Image.DecompressionBombError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"sample {i} ({self.sample_ids[i]}) of {self.name!r} is not a readable image "
                            f"({str(e).splitlines()[0]})") from None
        if im is None:
            raise UserError(f"sample {i} ({self.sample_ids[i]}) of {self.name!r} has no image")
        return im.convert("RGB")

    def caption(self, i: int) -> str:
        return self._captions[self._check(i)]

    def short_name(self, i: int) -> str:
        return self.sample_ids[self._check(i)] if self.folder is not None else super().short_name(i)

    def label_column(self, column: str) -> list[str]:
        import datasets

        feature = self._ds.features.get(column)
        if feature is None or column == self._image_col:
            raise UserError(f"unknown label column {column!r}: the dataset's columns are "
                            + ", ".join(c for c in self._ds.features if c != self._image_col))
        if isinstance(feature, datasets.ClassLabel):  # class ids -> their names
            return [feature.int2str(int(v)) for v in self._ds[column]]
        return [_first(v) for v in self._ds[column]]


def _check_images(files: list[str], name: str) -> None:
    """A file that is not an image by its name, refused before any model loads (opening every image
    would cost minutes on a large folder; one that lies about its type fails when read, in one line)."""
    known = Image.registered_extensions()
    bad = [f for f in files if Path(f).suffix.lower() not in known]
    if bad:
        raise UserError(f"metadata.jsonl of {name!r} lists {len(bad)} file(s) that are not images: "
                        + ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""))


def _first(value) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value)


def _split_arg(split: str, max_samples: int | None) -> str:
    if "[" in split:
        raise UserError(f"split {split!r}: give a plain split name and --max_samples N to take the first N")
    return split if max_samples is None else f"{split}[:{max_samples}]"


def load_hub(name: str, split: str | None, max_samples: int | None) -> HFDataset:
    """coco / flowers102 from the hub (or the local HF cache when HF_HUB_OFFLINE=1)."""
    import datasets

    split = split or "train"
    repo = HUB[name]
    try:
        ds = datasets.load_dataset(repo, split=_split_arg(split, max_samples))
    except Exception as e:  # offline, not found, bad split, broken download: all the user's to fix
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"cannot load dataset {name!r} ({repo}, split {split!r}) from the Hugging Face hub "
                        f"({why}); {OFFLINE_HINT}") from e
    return HFDataset(ds, name=name, split=split)


def load_folder(path: str, split: str | None, max_samples: int | None) -> HFDataset:
    """A local imagefolder: images plus metadata.jsonl with `file_name` and `text` per line."""
    import datasets

    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(f"no dataset folder at {str(folder)!r} (--dataset is shapes, {', '.join(HUB)} "
                        "or the path of a folder)")
    if not (folder / "metadata.jsonl").is_file():
        raise UserError(f"dataset folder {str(folder)!r} has no metadata.jsonl "
                        "(one JSON object per line with file_name and text)")
    split = split or "train"
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split=_split_arg(split, max_samples))
    except Exception as e:
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"cannot read the imagefolder {str(folder)!r} ({why})") from e
    return HFDataset(ds, name=str(folder), split=split, ids_from_paths_under=folder)
