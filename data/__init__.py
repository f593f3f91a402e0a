"""Datasets of paired (image, caption) samples (docs/design.md#datasets): `load_dataset(--dataset, ...)` and
`from_description(run.json's "dataset")`. `datasets` is imported only for hub and folder datasets,
so that `shapes` stays instant."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from data.base import DatasetInfo, PairedDataset, fingerprint
from data.hub import HUB, load_folder, load_hub
from data.shapes import ShapesConfig, ShapesDataset, attribute_matrix, attribute_names
from errors import UserError, check_at_least, check_positive

DATASETS = ("shapes", *HUB)
"""Names --dataset accepts, besides the path of a local imagefolder."""
DATASETS_HELP = "shapes (built-in, offline), coco, flowers102 (hub), or the path of a folder with metadata.jsonl"
SHAPES_DEFAULT_SAMPLES = 2000
SHAPES_ARGS = ("image_size", "seed", "offset", "where", "exclude")
"""Extra arguments of shapes, kept by describe() so that from_description() re-creates it."""

__all__ = ["DATASETS", "DATASETS_HELP", "DataOptions", "DatasetInfo", "PairedDataset", "ShapesConfig", "ShapesDataset",
           "attribute_matrix", "attribute_names", "fingerprint", "from_description", "label_matrix", "load_dataset",
           "relocate"]


@dataclass(kw_only=True)
class DataOptions:
    """Which samples a command reads (the training scripts, record.py)."""
    dataset: str = "shapes"
    """shapes (built-in, offline), coco, flowers102 (hub), or the path of a folder with metadata.jsonl."""
    split: str | None = None
    max_samples: int | None = None
    """Take the first N samples (shapes: 2000 by default)."""
    offset: int | None = None
    """shapes: start at this sample index (disjoint ranges are disjoint samples: held-out data)."""
    where: list[str] | None = None
    """shapes: keep only samples with all these attributes KEY=VALUE (shape=star, colour=red, size=small,
    position=center, background=blue, n_shapes=2)."""
    exclude: list[str] | None = None
    """shapes: drop samples with any of these attributes (same KEY=VALUE)."""

    def __post_init__(self):
        check_positive("max_samples", self.max_samples)
        check_at_least("offset", self.offset, 0)

    def load(self, shuffle_captions: int | None = None) -> PairedDataset:
        return load_dataset(self.dataset, split=self.split, max_samples=self.max_samples,
                            shuffle_captions=shuffle_captions, offset=self.offset, where=self.where,
                            exclude=self.exclude)


class CaptionsShuffled(PairedDataset):
    """A null baseline: every image keeps its id, but captions are permuted across samples, so whatever
    a text run over it shares with an image run is chance."""

    def __init__(self, ds: PairedDataset, seed: int):
        self.ds, self.seed = ds, int(seed)
        self.name, self.split, self.sample_ids = ds.name, ds.split, ds.sample_ids
        self.perm_N = np.random.default_rng(self.seed).permutation(len(ds))

    def image(self, i):
        return self.ds.image(i)

    def caption(self, i):
        return self.ds.caption(int(self.perm_N[self._check(i)]))

    def attributes(self, i):
        return self.ds.attributes(i)

    def short_name(self, i):
        return self.ds.short_name(i)

    @property
    def fingerprint(self) -> str:
        return self.ds.fingerprint

    def describe(self):
        return dataclasses.replace(self.ds.describe(), shuffle_captions=self.seed)


def load_dataset(name: str, split: str | None = None, max_samples: int | None = None,
                 shuffle_captions: int | None = None, **kwargs) -> PairedDataset:
    """The first `max_samples` samples (all when None; shapes: 2000) of dataset `name`.

    kwargs: `image_size`, `seed` for shapes; None values are ignored (so a CLI can pass its flags).
    `shuffle_captions=SEED` permutes captions across samples (a null baseline, same fingerprint).
    """
    ds = _load(name, split, max_samples, **kwargs)
    return ds if shuffle_captions is None else CaptionsShuffled(ds, shuffle_captions)


def _load(name: str, split: str | None, max_samples: int | None, **kwargs) -> PairedDataset:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) != max_samples
                                    or max_samples <= 0):
        raise UserError(f"max_samples must be a positive integer, got {max_samples!r}")
    allowed = SHAPES_ARGS if name == "shapes" else ()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise UserError(f"dataset {name!r} takes no option {', '.join(unknown)}"
                        + (f" (only shapes takes {', '.join(SHAPES_ARGS)})" if name != "shapes" else ""))
    if name == "shapes":
        if split not in (None, "default"):
            raise UserError(f"shapes has a single split 'default', not {split!r}")
        try:
            config = ShapesConfig(n_samples=int(max_samples or SHAPES_DEFAULT_SAMPLES),
                                  **{k: tuple(v) if k in ("where", "exclude") else int(v) for k, v in kwargs.items()})
        except (TypeError, ValueError) as e:
            raise UserError(f"shapes: bad option ({e})") from e
        return ShapesDataset(config)
    if name in HUB:
        return load_hub(name, split, max_samples)
    if os.path.isdir(os.path.expanduser(name)) or os.sep in name or name.startswith((".", "~")):
        return load_folder(name, split, max_samples)
    raise UserError(f"unknown dataset {name!r}: choose {DATASETS_HELP}")


def label_matrix(ds: PairedDataset, column: str | None = None) -> tuple[list[str], np.ndarray]:
    """(names, labels_NL): shapes' attributes, or (with `column`) one class per value of a label column,
    one-vs-rest."""
    if column is None:
        if not isinstance(ds, ShapesDataset):
            raise UserError(f"dataset {ds.name!r} has no built-in labels: "
                            "name one of its label columns (--label_column)")
        return attribute_matrix(ds)
    values = np.asarray(ds.label_column(column), dtype=object)
    names = sorted(set(values))
    return names, values[:, None] == np.asarray(names, dtype=object)[None, :]


_moved_to: str | None = None


def relocate(data_root: str | None) -> None:
    """Where local folder datasets are now (--data_root of the commands that read runs), for runs made
    over a folder that has since moved or been copied (to node-local disk, say); None: where they were."""
    global _moved_to
    _moved_to = data_root


def from_description(desc: DatasetInfo) -> PairedDataset:
    """Re-create the dataset a run was made on (same samples, order and fingerprint) from describe()."""
    name, n = desc.name, desc.n_samples
    folder = name not in DATASETS
    if folder and _moved_to is not None:
        name = _moved_to
    elif folder and not os.path.isdir(name):
        raise UserError(f"the run's dataset folder {name!r} is gone: if it moved, give its new place with "
                        "--data_root")
    ds = load_dataset(name, split=desc.split, max_samples=n, shuffle_captions=desc.shuffle_captions,
                      **({k: getattr(desc, k) for k in SHAPES_ARGS} if name == "shapes" else {}))
    want = desc.fingerprint
    if want not in (ds.fingerprint, getattr(ds, "path_fingerprint", None)):
        raise UserError(f"dataset {name!r} no longer matches the run: {len(ds)} samples with fingerprint "
                        f"{ds.fingerprint[:12]}, the run has {n} with {str(want)[:12]}")
    return ds
