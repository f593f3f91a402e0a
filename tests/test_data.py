"""data/: the shapes generator says what it draws, datasets re-create themselves from run.json,
local folders load offline, hub datasets fail fast and clearly offline."""
from __future__ import annotations

import json
import re
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import data
from data.base import fingerprint
from errors import UserError
from saeshare.disk.files import from_jsonable, to_jsonable

# The test's own idea of the colour names, independent of data/shapes.py's palette.
PALETTE = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "orange": (255, 140, 0), "purple": (128, 0, 128), "white": (255, 255, 255), "black": (0, 0, 0),
           "gray": (128, 128, 128)}
POSITION_WORDS = {"top left", "top right", "bottom left", "bottom right", "center", "middle"}
SHAPE_WORDS = {"circle", "square", "triangle", "diamond", "star", "cross"}
PHRASE = re.compile(r"a (small|large) (\w+) (\w+) (?:at|in) the (top left|top right|bottom left|bottom right"
                    r"|center|middle)(?: corner)?")


def colour_name(rgb) -> str:
    return min(PALETTE, key=lambda c: sum((int(a) - b) ** 2 for a, b in zip(rgb, PALETTE[c])))


def region(position: str, size: int) -> tuple[slice, slice]:
    """(rows, cols) where a shape at `position` must lie, and no other shape can."""
    lo, hi = slice(0, size // 3), slice(size - size // 3, size)
    mid = slice(int(0.4 * size), int(0.6 * size))
    return {"top left": (lo, lo), "top right": (lo, hi), "bottom left": (hi, lo), "bottom right": (hi, hi),
            "center": (mid, mid)}[position]


# --- shapes -----------------------------------------------------------------------------------

def test_shapes_is_deterministic():
    a, b = data.load_dataset("shapes", max_samples=30), data.load_dataset("shapes", max_samples=30)
    assert len(a) == 30 and a.sample_ids == b.sample_ids and a.fingerprint == b.fingerprint
    for i in range(30):
        assert a.caption(i) == b.caption(i) and a.attributes(i) == b.attributes(i)
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i)))


def test_shapes_defaults_and_speed():
    t = time.perf_counter()
    ds = data.load_dataset("shapes")
    captions = [ds.caption(i) for i in range(len(ds))]
    assert time.perf_counter() - t < 2.0
    assert len(ds) == 2000 and ds.split == "default" and ds.name == "shapes"
    assert len(set(captions)) > 1000  # varied, not a handful of templates
    im = ds.image(0)
    assert im.mode == "RGB" and im.size == (128, 128)


def test_sample_does_not_depend_on_n_but_on_seed():
    small, big = data.load_dataset("shapes", max_samples=5), data.load_dataset("shapes", max_samples=50)
    assert big.sample_ids[:5] == small.sample_ids
    for i in range(5):
        assert small.caption(i) == big.caption(i)
        assert np.array_equal(np.asarray(small.image(i)), np.asarray(big.image(i)))
    assert small.fingerprint != big.fingerprint
    other = data.load_dataset("shapes", max_samples=5, seed=1)
    assert other.fingerprint != small.fingerprint
    assert [other.caption(i) for i in range(5)] != [small.caption(i) for i in range(5)]


def test_captions_are_faithful_to_attributes():
    ds = data.load_dataset("shapes", max_samples=400)
    seen = Counter()
    for i in range(len(ds)):
        attrs, cap = ds.attributes(i), ds.caption(i)
        said = sorted((size, colour, shape, "center" if pos == "middle" else pos)
                      for size, colour, shape, pos in PHRASE.findall(cap))
        truth = sorted((s["size"], s["colour"], s["shape"], s["position"]) for s in attrs["shapes"])
        assert said == truth, cap
        assert attrs["n_shapes"] == len(truth) and (" and " in cap) == (len(truth) == 2)
        assert re.findall(r"(\w+) background", cap) == [attrs["background"]], cap
        # no colour, shape or position word beyond those drawn
        words = set(cap.split()) | {" ".join(p) for p in zip(cap.split(), cap.split()[1:])}
        assert words & set(PALETTE) == {s["colour"] for s in attrs["shapes"]} | {attrs["background"]}, cap
        assert words & SHAPE_WORDS == {s["shape"] for s in attrs["shapes"]}, cap
        assert len(words & POSITION_WORDS) == len({s["position"] for s in attrs["shapes"]}), cap
        assert all(s["colour"] != attrs["background"] for s in attrs["shapes"])
        seen.update([attrs["n_shapes"], attrs["background"]] + [v for s in attrs["shapes"] for v in s.values()])
    # every value of every attribute occurs
    assert {1, 2, "small", "large", "top left", "top right", "bottom left", "bottom right", "center"} <= set(seen)
    assert len(SHAPE_WORDS & set(seen)) == 6 and len(set(PALETTE) & set(seen)) >= 8


@pytest.mark.parametrize("size", [128, 64])
def test_images_show_what_the_caption_says(size):
    ds = data.load_dataset("shapes", max_samples=150, image_size=size)
    areas = {}  # (shape, size) -> pixel counts
    for i in range(len(ds)):
        attrs, px = ds.attributes(i), np.asarray(ds.image(i))
        assert px.shape == (size, size, 3)
        bg = px[0, 0]
        for y, x in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
            assert np.array_equal(px[y, x], bg)
        assert colour_name(bg) == attrs["background"]
        occupied = {s["position"]: s for s in attrs["shapes"]}
        for pos in ["top left", "top right", "bottom left", "bottom right", "center"]:
            patch = px[region(pos, size)].reshape(-1, 3)
            fg = patch[np.any(patch != bg, axis=1)]
            if pos not in occupied:
                assert len(fg) == 0, (i, pos)
                continue
            s = occupied[pos]
            main, _ = Counter(map(tuple, fg)).most_common(1)[0]  # the fill; edges are blended
            assert colour_name(main) == s["colour"], (i, ds.caption(i))
            if pos != "center":  # the centre region clips a large shape
                areas.setdefault((s["shape"], s["size"]), []).append(len(fg))
    for shape in SHAPE_WORDS:  # a large shape is clearly larger than a small one of the same kind
        if (shape, "small") in areas and (shape, "large") in areas:
            assert min(areas[shape, "large"]) > 2 * max(areas[shape, "small"]), shape


def test_attribute_matrix_matches_attributes():
    ds = data.load_dataset("shapes", max_samples=200)
    names, attrs_NA = data.attribute_matrix(ds)
    assert attrs_NA.shape == (200, len(names)) and attrs_NA.dtype == bool and len(set(names)) == len(names)
    col = {n: k for k, n in enumerate(names)}
    for n in range(len(ds)):
        a = ds.attributes(n)
        assert attrs_NA[n, col["red"]] == any(s["colour"] == "red" for s in a["shapes"])
        assert attrs_NA[n, col["circle"]] == any(s["shape"] == "circle" for s in a["shapes"])
        assert attrs_NA[n, col["top left"]] == any(s["position"] == "top left" for s in a["shapes"])
        assert attrs_NA[n, col["red circle"]] == any(
            (s["colour"], s["shape"]) == ("red", "circle") for s in a["shapes"])
        assert attrs_NA[n, col["bg:" + a["background"]]]
        assert attrs_NA[n, col["two shapes"]] == (a["n_shapes"] == 2) != attrs_NA[n, col["one shape"]]
        assert attrs_NA[n, [col[b] for b in names if b.startswith("bg:")]].sum() == 1
    assert attrs_NA.any(0)[[col[c] for c in ["small", "large", "center", "star", "red"]]].all()


def test_shapes_bad_options():
    for kwargs in [dict(image_size=8), dict(split="train"), dict(max_samples=0), dict(max_samples=-3),
                   dict(colour="red")]:
        with pytest.raises(UserError):
            data.load_dataset("shapes", **kwargs)
    assert len(data.load_dataset("shapes", max_samples=3, image_size=None, seed=None)) == 3  # CLI defaults


# --- fingerprint and describe -----------------------------------------------------------------
def stored(desc: dict) -> data.DatasetInfo:
    """A dataset description as read back from run.json."""
    return from_jsonable(data.DatasetInfo, desc, "dataset")


def test_fingerprint():
    f = fingerprint("coco", "train", ["1", "2"])
    assert f == fingerprint("coco", "train", ["1", "2"]) and re.fullmatch(r"[0-9a-f]{64}", f)
    for other in [("coco", "train", ["2", "1"]), ("coco", "train", ["1"]), ("flowers102", "train", ["1", "2"]),
                  ("coco", "validation", ["1", "2"])]:
        assert fingerprint(*other) != f
    ds = data.load_dataset("shapes", max_samples=4)
    assert ds.fingerprint == fingerprint("shapes", ds.split, ds.sample_ids)
    # the image size does not change which samples these are: an image run and a text run match
    assert data.load_dataset("shapes", max_samples=4, image_size=64).fingerprint == ds.fingerprint


def test_from_description_round_trip():
    ds = data.load_dataset("shapes", max_samples=12, image_size=64, seed=3)
    desc = json.loads(json.dumps(to_jsonable(ds.describe())))  # as stored in run.json
    assert desc["n_samples"] == 12 and desc["fingerprint"] == ds.fingerprint and desc["name"] == "shapes"
    again = data.from_description(stored(desc))
    assert again.sample_ids == ds.sample_ids and again.fingerprint == ds.fingerprint
    assert [again.caption(i) for i in range(12)] == [ds.caption(i) for i in range(12)]
    assert np.array_equal(np.asarray(again.image(11)), np.asarray(ds.image(11)))
    with pytest.raises(UserError, match="no longer matches"):
        data.from_description(stored({**desc, "fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="missing key 'dataset.name'"):  # refused when run.json is read
        stored({"split": "default"})


# --- local folders ----------------------------------------------------------------------------

def write_folder(root, n=4):
    rows = []
    (root / "sub").mkdir(parents=True)
    for k in range(n):
        name = f"sub/img{k}.png" if k == 2 else f"img{k}.png"
        colour = list(PALETTE.values())[k]
        im = Image.new("RGB", (16 + k, 12), colour)
        if k == 1:
            im = im.convert("RGBA")  # must come back as RGB
        im.save(root / name)
        rows.append({"file_name": name, "text": f"a flat {list(PALETTE)[k]} picture number {k}"})
    rows = rows[::-1]  # the metadata order, not the file order, is the sample order
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_imagefolder_round_trip(tmp_path, monkeypatch):
    rows = write_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    ds = data.load_dataset("./imgs")
    assert ds.name == str((tmp_path / "imgs").resolve()) and ds.split == "train" and ds.attributes(0) is None
    assert ds.sample_ids == [r["file_name"] for r in rows]
    assert [ds.caption(i) for i in range(len(ds))] == [r["text"] for r in rows]
    for i, r in enumerate(rows):
        im = ds.image(i)
        assert im.mode == "RGB" and colour_name(im.getpixel((0, 0))) in r["text"]
    again = data.from_description(stored(json.loads(json.dumps(to_jsonable(ds.describe())))))
    assert again.fingerprint == ds.fingerprint and again.sample_ids == ds.sample_ids
    first2 = data.load_dataset(str(tmp_path / "imgs"), max_samples=2)
    assert first2.sample_ids == ds.sample_ids[:2] and first2.fingerprint != ds.fingerprint
    assert data.load_dataset(str(tmp_path / "imgs"), max_samples=100).fingerprint == ds.fingerprint


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError, match="no dataset folder"):
        data.load_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="metadata.jsonl"):
        data.load_dataset(str(tmp_path / "empty"))
    write_folder(tmp_path / "ok")
    with pytest.raises(UserError):
        data.load_dataset(str(tmp_path / "ok"), image_size=64)  # a shapes-only option


def test_columns_are_found_from_features():
    import datasets

    from data.hub import HFDataset

    ims = [Image.new("L", (8, 8), v) for v in (0, 255, 128)]
    raw = datasets.Dataset.from_dict({
        "image_id": [7, 3, 9], "url": ["u1", "u2", "u3"], "picture": ims,
        "captions": [["first of 7", "second"], ["first of 3"], ["first of 9"]],
    }).cast_column("picture", datasets.Image())
    ds = HFDataset(raw, name="coco", split="train")
    assert ds.sample_ids == ["7", "3", "9"]
    assert [ds.caption(i) for i in range(3)] == ["first of 7", "first of 3", "first of 9"]
    assert ds.image(1).mode == "RGB" and ds.image(1).getpixel((0, 0)) == (255, 255, 255)
    dup = datasets.Dataset.from_dict({"id": [1, 1], "image": ims[:2], "text": ["a", "b"]}).cast_column(
        "image", datasets.Image())
    assert HFDataset(dup, name="x", split="train").sample_ids == ["0", "1"]  # ids must be unique
    with pytest.raises(UserError, match="image column"):
        HFDataset(datasets.Dataset.from_dict({"text": ["a"]}), name="x", split="train")


# --- hub and names ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["coco", "flowers102"])
def test_hub_offline_fails_fast_and_clearly(name):
    t = time.perf_counter()
    with pytest.raises(UserError) as e:
        data.load_dataset(name, max_samples=10)
    assert time.perf_counter() - t < 15
    msg = str(e.value)
    assert name in msg and "shapes" in msg and "\n" not in msg
    with pytest.raises(UserError):
        data.from_description(stored({"name": name, "split": "train", "n_samples": 10, "fingerprint": "0" * 64}))


def test_unknown_dataset_lists_choices():
    with pytest.raises(UserError) as e:
        data.load_dataset("imagenet")
    assert all(n in str(e.value) for n in data.DATASETS)
    assert set(data.DATASETS) == {"shapes", "coco", "flowers102"}


def test_shuffled_captions_are_a_permutation_with_the_same_fingerprint():
    ds = data.load_dataset("shapes", max_samples=50)
    null = data.load_dataset("shapes", max_samples=50, shuffle_captions=3)
    assert null.fingerprint == ds.fingerprint
    assert sorted(null.caption(i) for i in range(50)) == sorted(ds.caption(i) for i in range(50))
    assert sum(null.caption(i) != ds.caption(i) for i in range(50)) > 40
    assert null.image(7).tobytes() == ds.image(7).tobytes()
    again = data.from_description(null.describe())
    assert [again.caption(i) for i in range(50)] == [null.caption(i) for i in range(50)]
