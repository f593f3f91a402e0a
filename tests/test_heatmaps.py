"""show.py --heatmaps: the heat on each tile is the SAE applied to every token of the layer, for the very
tokens whose mean the run recorded; the tiles change where the feature fires, and the page loads."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

import show
import train_image
from saeshare.disk.runs import Run
from saeshare.render.heatmaps import TokenMaps, overlay
from test_show import CHROMIUM, chromium


@pytest.fixture(scope="module")
def effnet(tmp_path_factory):
    root = tmp_path_factory.mktemp("heat")
    train_image.main(["--model", "EfficientNetLite", "--runname", "e", "--root", str(root), "--max_samples", "48",
                      "--image_size", "64", "--layers", "0", "3", "--device", "cpu", "--lr", "1e-3"])
    return Run.open(root, "e")


def test_heat_is_the_sae_on_the_recorded_tokens(effnet):
    maps = TokenMaps(effnet, 3)
    sae = effnet.sae(3)
    W, b = sae.W_enc.double().numpy(), sae.b_dec.double().numpy()
    for n in (0, 5, 41):
        inputs = maps.encoder.collate([maps.encoder.transform(maps.ds.image(n))])
        tokens = maps.encoder.record(inputs, [3])[3][0].double().numpy()
        np.testing.assert_allclose(tokens.mean(0), effnet.acts(3)[n], rtol=1e-4, atol=1e-5)  # what the run kept
        brute = np.maximum((tokens - b) @ W, 0)
        side = int(np.sqrt(len(tokens)))
        for f in (0, 7, 100):
            np.testing.assert_allclose(maps.heat(n, f), brute[:, f].reshape(side, side), rtol=1e-4, atol=1e-5)


def test_overlay_marks_only_where_it_fires():
    tile = Image.new("RGB", (40, 40), (200, 200, 200))
    heat = np.zeros((4, 4))
    heat[0, 0] = 2.0
    out = np.asarray(overlay(tile, heat, (80, 80), scale=2.0)).astype(int)
    assert (out[35:, 35:] == 200).all() and (np.abs(out[:5, :5] - 200).sum(-1) > 30).all()
    wide = np.asarray(overlay(tile, np.ones((4, 4)), (80, 40), scale=1.0)).astype(int)  # letterboxed: rows 10-29
    assert (wide[:9] == 200).all() and (np.abs(wide[15] - 200).sum(-1) > 30).all()


def test_gallery_with_heatmaps_and_labels(effnet, tmp_path, error_line):
    out = tmp_path / "g"
    base = ["--run", "e", "--root", str(effnet.path.parent), "--layer", "3", "--device", "cpu", "--min_active", "1"]
    show.main([*base, "--out", str(tmp_path / "plain"), "--max_features", "4"])
    show.main([*base, "--out", str(out), "--max_features", "4", "--heatmaps", "--labels"])
    grids = sorted(out.glob("*.jpg"))
    assert len(grids) == 4 and "<b>label</b>" in (out / "index.html").read_text()
    plain = [np.asarray(Image.open(tmp_path / "plain" / g.name)).astype(int) for g in grids]
    heated = [np.asarray(Image.open(g)).astype(int) for g in grids]
    assert any(np.abs(a - b).mean() > 2 for a, b in zip(plain, heated))  # the heat is drawn
    if CHROMIUM is not None:
        url = (out / "index.html").resolve().as_uri()
        dom = chromium(["--dump-dom", url], tmp_path)
        loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
        assert loaded == 4
        shot = tmp_path / "shot.png"
        chromium([f"--screenshot={shot}", "--window-size=1200,900", url], tmp_path)
        assert Image.open(shot).size == (1200, 900)


def test_heatmaps_of_a_text_run_are_one_line(tmp_path, error_line):
    import data
    from synthetic import make_run, random_sae_state

    make_run(tmp_path, "t", {0: np.zeros((8, 4), np.float32)}, {0: random_sae_state(4, 8)}, modality="text",
             dataset=data.load_dataset("shapes", max_samples=8).describe())
    assert "heatmaps lie on images" in error_line(show.main, ["--run", "t", "--root", str(tmp_path), "--heatmaps",
                                                              "--out", str(tmp_path / "o"), "--device", "cpu"])
