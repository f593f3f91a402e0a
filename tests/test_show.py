"""show.py (docs/design.md#previews): top-9 grids checked against a brute-force argsort of dense codes and against the
dataset's own images, the gallery page (parsed, and rendered by headless Chromium), --from_json, bad input."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import show
from saeshare.disk.runs import Run
from saeshare.render.gallery import Card, write_index
from synthetic import make_run, random_sae_state  # also puts the project on sys.path

N, D, F = 60, 8, 24
RARE = {0: 0, 1: 5, 2: 12}
"""Planted features -> number of samples they are active on (all under the default --min_active 16)."""
IMAGE_SIZE = 32


def _layer(rng, seed):
    """Gaussian activations with a constant last coordinate, and an SAE whose features 0..2 are planted
    to fire on exactly RARE[f] samples: code = relu(x_0 - t)."""
    x = rng.normal(size=(N, D)).astype(np.float32)
    x[:, -1] = 1.0
    state = random_sae_state(D, F, seed=seed)
    state["b_dec"][:] = 0.0
    for f, n_active in RARE.items():
        state["W_enc"][:, f] = 0.0
        state["W_enc"][0, f] = 1.0
        state["W_enc"][-1, f] = -float(np.sort(x[:, 0])[-n_active - 1] if n_active else 1e3)
    return x, state


def shapes_run(root, name, modality, seed, layers=(1, 3)):
    """A synthetic run (no model) whose run.json describes a real `shapes` dataset, so show.py re-creates it."""
    ds = data.load_dataset("shapes", max_samples=N, image_size=IMAGE_SIZE)
    rng = np.random.default_rng(seed)
    built = {layer: _layer(rng, seed * 10 + layer) for layer in layers}
    return make_run(root, name, {layer: x for layer, (x, _) in built.items()},
                    {layer: s for layer, (_, s) in built.items()}, top_k=4, modality=modality, dataset=ds.describe())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    shapes_run(root, "img", "image", 1)
    shapes_run(root, "txt", "text", 2)
    shapes_run(root, "img2", "image", 3, layers=(0, 2))
    return root


@pytest.fixture(scope="module")
def ds():
    return data.load_dataset("shapes", max_samples=N, image_size=IMAGE_SIZE)


def brute_force(run, layer, codes="relu"):
    """(mass_F, n_active_F, order_NF): the reference, from all dense codes at once."""
    codes_NF = run.dense_codes(layer, codes).double().numpy()
    return codes_NF, codes_NF.sum(0), (codes_NF > 0).sum(0), np.argsort(-codes_NF, axis=0, kind="stable")


@pytest.fixture(scope="module")
def gallery(root, tmp_path_factory):
    """show.py --run img with a small chunk size (streaming over 9 chunks)."""
    out = tmp_path_factory.mktemp("g") / "img"
    show.main(["--run", "img", "--root", str(root), "--out", str(out), "--chunk_size", "7", "--max_features", "0"])
    return out


def tiles(grid: Image.Image, captions: bool) -> list[np.ndarray]:
    """The 9 image squares of a grid, row by row."""
    w, h = show.tile_size(captions)
    arr = np.asarray(grid, dtype=np.float32)
    return [arr[(p // 3) * h + show.PAD:(p // 3) * h + show.PAD + show.TILE,
                (p % 3) * w + show.PAD:(p % 3) * w + show.PAD + show.TILE] for p in range(9)]


# ---- streaming top-9 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("codes", ["relu", "topk"])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_streaming_stats_equal_brute_force(root, codes, chunk):
    run = Run.open(root, "img")
    codes_NF, mass_F, n_active_F, order_NF = brute_force(run, 3, codes)
    stats = show.feature_stats(run, -1, codes, chunk_size=chunk, show_progress=False)
    np.testing.assert_allclose(stats.mass_F, mass_F, rtol=1e-5)
    np.testing.assert_array_equal(stats.n_active_F, n_active_F)
    assert stats.top_idx_KF.shape == stats.top_val_KF.shape == (9, F)
    np.testing.assert_allclose(stats.top_val_KF, np.take_along_axis(codes_NF, order_NF[:9], 0), rtol=1e-5)
    active = stats.top_val_KF > 0  # ties among zeros may come in any order
    np.testing.assert_array_equal(stats.top_idx_KF[active], order_NF[:9][active])
    if codes == "relu":
        assert (n_active_F[list(RARE)] == list(RARE.values())).all()


def test_more_top_samples_than_samples(root):
    run = Run.open(root, "img")
    codes_NF, _, _, order_NF = brute_force(run, 1)
    stats = show.feature_stats(run, 1, k=N + 5, chunk_size=16, show_progress=False)
    assert stats.top_idx_KF.shape == (N, F)
    np.testing.assert_allclose(stats.top_val_KF, np.take_along_axis(codes_NF, order_NF, 0), rtol=1e-5)
    assert all(sorted(stats.top_idx_KF[:, f]) == list(range(N)) for f in range(F))


# ---- grids and page ---------------------------------------------------------------------------------------
def test_grids_are_the_top9_samples_of_the_features_shown(root, gallery, ds):
    run = Run.open(root, "img")
    _, mass_F, n_active_F, order_NF = brute_force(run, 3)
    expect = [f for f in np.argsort(-mass_F, kind="stable") if n_active_F[f] >= show.MIN_ACTIVE]
    assert set(RARE).isdisjoint(expect) and len(expect) > 3
    names = {show.grid_name(f, mass_F[f]) for f in expect}
    assert {p.name for p in gallery.glob("*.jpg")} == names
    assert re.fullmatch(r"feat\d+_[0-9.]+\.jpg", next(iter(names)))
    refs = np.stack([np.asarray(show.fit_tile(ds.image(n)), dtype=np.float32) for n in range(N)])  # [N, T, T, 3]
    w, h = show.tile_size(captions=False)
    for f in expect[:4]:
        grid = Image.open(gallery / show.grid_name(f, mass_F[f]))
        assert grid.size == (3 * w, 3 * h)
        for tile, n in zip(tiles(grid, False), order_NF[:9, f]):
            err_N = np.abs(refs - tile).mean(axis=(1, 2, 3))  # JPEG: close to its sample, far from the others
            assert err_N.argmin() == n and err_N[n] < 4


def test_index_lists_cards_by_mass(root, gallery):
    run = Run.open(root, "img")
    _, mass_F, n_active_F, _ = brute_force(run, 3)
    html = (gallery / "index.html").read_text()
    cards = [int(f) for f in re.findall(r'<article class="card item" data-feature="(\d+)"', html)]
    assert cards == [f for f in np.argsort(-mass_F, kind="stable") if n_active_F[f] >= 16]
    for f in cards:
        assert f'src="{show.grid_name(f, mass_F[f])}"' in html
    assert "Synthetic" in html and "layer 3" in html and "shapes" in html
    assert "http://" not in html and "https://" not in html  # nothing to fetch: works from disk
    assert html.count("<img ") == len(cards)


def test_text_run_grids_show_captions(root, tmp_path, ds):
    out = tmp_path / "t"
    show.main(["--run", "txt", "--root", str(root), "--out", str(out), "--max_features", "2", "--layer", "1"])
    grids = sorted(out.glob("*.jpg"))
    assert len(grids) == 2
    w, h = show.tile_size(captions=True)
    assert h > show.tile_size(captions=False)[1]
    grid = Image.open(grids[0])
    assert grid.size == (3 * w, 3 * h)
    band = np.asarray(grid, dtype=np.float32)[show.PAD + show.TILE + show.INFO_H:h - show.PAD, show.PAD:w - show.PAD]
    assert (band.min(axis=2) < 100).any()  # dark caption text under the first tile
    html = (out / "index.html").read_text()
    first = int(re.search(r'data-feature="(\d+)"', html).group(1))
    stats = show.feature_stats(Run.open(root, "txt"), 1, show_progress=False)
    assert ds.caption(int(stats.top_idx_KF[0, first])) in html


def test_features_flag_max_features_and_min_active(root, tmp_path, capsys):
    out = tmp_path / "f"
    show.main(["--run", "img", "--root", str(root), "--out", str(out), "--features", "1", "5", "1"])
    feats = sorted(int(p.name.split("_")[0][4:]) for p in out.glob("*.jpg"))
    assert feats == [1, 5]  # 1 is active on 5 samples: shown since asked for, with a note
    assert "fewer than 16" in capsys.readouterr().err
    stats = show.feature_stats(Run.open(root, "img"), 3, show_progress=False)
    top = Image.open(next(out.glob("feat1_*.jpg")))
    blank = np.array(show.BLANK, dtype=np.float32)
    assert [np.abs(t - blank).mean() < 3 for t in tiles(top, False)] == [False] * 5 + [True] * 4  # 4 grey tiles
    assert (stats.top_val_KF[5:, 1] == 0).all()
    out2 = tmp_path / "m"
    show.main(["--run", "img", "--root", str(root), "--out", str(out2), "--max_features", "3", "--min_active", "1"])
    assert len(list(out2.glob("*.jpg"))) == 3
    assert show.select_features(stats, 1, 0) == show.select_features(stats, 1, 100)
    assert 2 in show.select_features(stats, 12, 0) and 2 not in show.select_features(stats, 13, 0)


def test_overwrite(root, gallery, tmp_path, error_line):
    before = sorted(p.name for p in gallery.iterdir())
    assert "already exists" in error_line(show.main, ["--run", "img", "--root", str(root), "--out", str(gallery)])
    assert sorted(p.name for p in gallery.iterdir()) == before
    out = tmp_path / "o"
    show.main(["--run", "img", "--root", str(root), "--out", str(out), "--max_features", "2"])
    show.main(["--run", "img", "--root", str(root), "--out", str(out), "--features", "7", "--overwrite"])
    assert [p.name.split("_")[0] for p in out.glob("*.jpg")] == ["feat7"]  # no stale grid left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    assert "not a gallery" in error_line(show.main, ["--run", "img", "--root", str(root),
                                                     "--out", str(tmp_path / "notes"), "--overwrite"])
    assert not list(tmp_path.glob(".*tmp*"))


def test_from_json_of_a_null(root, tmp_path):
    """comp_sharedness.py --null permute writes the runs' own names (and null: true), so show.py can read it."""
    import comp_sharedness

    path = tmp_path / "null.json"
    comp_sharedness.main(["--root", str(root), "--source", "img", "--min_group", "txt", "--max_group", "img2",
                          "--null", "permute", "--top", "2", "--device", "cpu", "--json", str(path)])
    got = json.loads(path.read_text())
    assert got["null"] is True and got["min_group"] == ["txt"] and set(got["features"][0]["rho"]) == {"txt", "img2"}
    show.main(["--from_json", str(path), "--root", str(root), "--out", str(tmp_path / "g")])
    assert (tmp_path / "g" / "index.html").is_file()


def test_from_json(root, tmp_path, monkeypatch):
    src = show.feature_stats(Run.open(root, "img"), 3, show_progress=False)
    feats = [{"feature": 4, "delta": 2.5, "mass": 1.0, "rho": {"txt": 0.8, "img2": 0.1},
              "match": {"txt": 6, "img2": 9}},
             {"feature": 1, "delta": 1.5, "mass": 1.0, "rho": {"txt": 0.7, "img2": -0.2},
              "match": {"txt": 6, "img2": 3}}]
    path = tmp_path / "shared.json"
    path.write_text(json.dumps({"source": "img", "min_group": ["txt"], "max_group": ["img2"], "codes": "relu",
                                "layers": {"img2": 0}, "features": feats}))
    out = tmp_path / "first"
    show.main(["--from_json", str(path), "--root", str(root), "--out", str(out)])
    html = (out / "index.html").read_text()
    assert re.findall(r'<section class="group item" data-feature="(\d+)"', html) == ["4", "1"]
    txt = show.feature_stats(Run.open(root, "txt"), 3, show_progress=False)  # no "layers" entry: last layer
    img2 = show.feature_stats(Run.open(root, "img2"), 0, show_progress=False)
    expect = {f"img/{show.grid_name(i, src.mass_F[i])}" for i in (4, 1)} | {f"txt/{show.grid_name(6, txt.mass_F[6])}"} \
        | {f"img2/{show.grid_name(j, img2.mass_F[j])}" for j in (9, 3)}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.jpg")} == expect
    for rel in expect:
        assert f'src="{rel}"' in html
    assert "+0.800" in html and "-0.200" in html and html.count('class="card G"') == 2
    monkeypatch.chdir(tmp_path)  # by default, the JSON file's stem names the output folder
    show.main(["--from_json", str(path), "--root", str(root), "--max_features", "1"])
    html = (tmp_path / "imgs" / "shared" / "index.html").read_text()
    assert re.findall(r'<section class="group item" data-feature="(\d+)"', html) == ["4"]


def test_page_escapes_captions(tmp_path):
    card = Card("feature 3", 3, "feat3_1.jpg", (30, 30), 1.0, 2, 10, [(0, 1.0, '<script>alert("x")</script> & co')])
    write_index(tmp_path / "index.html", "t<b>", [("model", "<i>")], [card], [("mass", "mass")])
    html = (tmp_path / "index.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in html
    assert "<i>" not in html and "t&lt;b&gt;" in html


# ---- bad input --------------------------------------------------------------------------------------------
def test_bad_input(root, tmp_path, error_line):
    base = ["--root", str(root), "--out", str(tmp_path / "x")]
    assert "no run 'nope'" in error_line(show.main, ["--run", "nope", *base])
    assert "layer 2 is not recorded" in error_line(show.main, ["--run", "img", "--layer", "2", *base])
    assert "has features 0..23" in error_line(show.main, ["--run", "img", "--features", "3", "24", *base])
    line = error_line(show.main, ["--from_json", "a.json", "--layer", "1", *base])
    assert "--layer and --features go with --run" in line
    assert "no such file" in error_line(show.main, ["--from_json", str(tmp_path / "a.json"), *base]).lower()
    (tmp_path / "bad.json").write_text(json.dumps({"source": "img", "features": []}))
    err = error_line(show.main, ["--from_json", str(tmp_path / "bad.json"), *base])
    assert "not a comp_sharedness.py --json output" in err
    (tmp_path / "big.json").write_text(json.dumps({"source": "img", "min_group": ["txt"], "max_group": [], "features": [
        {"feature": 99, "delta": 1, "rho": {"txt": 0.5}, "match": {"txt": 0}}]}))
    line = error_line(show.main, ["--from_json", str(tmp_path / "big.json"), *base])
    assert "names features [99] of run 'img'" in line
    # a run whose dataset cannot be reached offline
    shutil.copytree(root / "img", tmp_path / "runs" / "coco_run")
    meta_path = tmp_path / "runs" / "coco_run" / "run.json"
    meta = json.loads(meta_path.read_text())
    meta["dataset"] = {**meta["dataset"], "name": "coco", "split": "train"}
    meta_path.write_text(json.dumps(meta))
    err = error_line(show.main, ["--run", "coco_run", "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "x")])
    assert "cannot re-create its dataset" in err and "coco" in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


# ---- the page in a real browser ---------------------------------------------------------------------------
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def chromium(args: list[str], tmp_path: Path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_gallery_in_headless_chromium(gallery, tmp_path):
    url = (gallery / "index.html").resolve().as_uri()
    dom = chromium(["--dump-dom", url], tmp_path)
    cards = re.findall(r'<article class="card item" data-feature="(\d+)"', dom)
    assert len(cards) == len(list(gallery.glob("*.jpg"))) > 3
    body = re.search(r"<body[^>]*>", dom).group(0)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    assert loaded == total == len(cards)  # every grid decoded (naturalWidth > 0)
    assert f"{len(cards)} of {len(cards)} features" in dom
    # the filter, set from the address: only feature cards[1] stays visible
    dom = chromium(["--dump-dom", f"{url}#q=%23{cards[1]}"], tmp_path)
    tags = re.findall(r'<article class="card item" data-feature="(\d+)"([^>]*)>', dom)
    assert [f for f, attrs in tags if "hidden" not in attrs] == [cards[1]] and f"1 of {len(cards)} features" in dom
    shot = tmp_path / "shot.png"
    chromium([f"--screenshot={shot}", "--window-size=1400,1000", url], tmp_path)
    assert Image.open(shot).size == (1400, 1000)
