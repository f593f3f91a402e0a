"""What every dataset is: N (image, caption) pairs in a fixed order with stable ids (docs/design.md#datasets)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

from PIL import Image

from errors import UserError


def fingerprint(name: str, split: str, sample_ids: list[str], **content) -> str:
    """sha256 of (name, split, ids in order, and any `content`): equal for an image run and a text run over
    the same samples, different as soon as one sample or the order differs."""
    blob = json.dumps({"name": name, "split": split, "sample_ids": list(sample_ids), **content}, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class DatasetInfo:
    """What a run records of its dataset (run.json's "dataset"): enough for `data.from_description` to
    re-create the same samples in the same order."""
    name: str
    """--dataset: "shapes", "coco", "flowers102", or the absolute path of a local folder (where it was: a
    moved folder is found again with --data_root)."""
    split: str
    n_samples: int
    fingerprint: str
    """sha256 of the samples in order (a folder's: file names relative to it, sizes and captions, never its
    path): runs are comparable only when theirs are equal."""
    image_size: int | None = None
    """shapes only: side of the generated images."""
    seed: int | None = None
    """shapes only: generator seed."""
    offset: int | None = None
    """shapes only: first sample index."""
    where: list[str] | None = None
    """shapes only: attribute filters KEY=VALUE every sample has."""
    exclude: list[str] | None = None
    """shapes only: attribute filters no sample has."""
    shuffle_captions: int | None = None
    """A null run's caption permutation seed (captions shuffled across samples)."""


class PairedDataset:
    """Base class: sample n of a vision run and sample n of a text run are the same pair."""

    name: str
    """What --dataset was: "shapes", "coco", "flowers102", or the absolute path of a local folder."""
    split: str
    """"train" for hub and local folders, "default" for shapes."""
    sample_ids: list[str]
    """Stable ids in order."""

    def __len__(self) -> int:
        return len(self.sample_ids)

    def image(self, i: int) -> Image.Image:
        """Image of sample i, RGB."""
        raise NotImplementedError

    def caption(self, i: int) -> str:
        raise NotImplementedError

    def short_name(self, i: int) -> str:
        """How sample i is named on a tile: its row, or a folder's file name."""
        return f"#{self._check(i)}"

    def attributes(self, i: int) -> dict | None:
        """Ground truth of sample i (shapes only); None elsewhere."""
        self._check(i)
        return None

    def label_column(self, column: str) -> list[str]:
        """Sample n's value in a label column (hub and local datasets; shapes has attributes instead)."""
        raise UserError(f"dataset {self.name!r} has no label column {column!r}: "
                        "only hub and local datasets have columns (shapes: use its attributes as labels)")

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.name, self.split, self.sample_ids)

    def describe(self) -> DatasetInfo:
        """For run.json; `data.from_description` re-creates the same dataset from it."""
        return DatasetInfo(self.name, self.split, len(self), self.fingerprint)

    def _check(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples of {self.name!r}")
        return i

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n_samples={len(self)})"
