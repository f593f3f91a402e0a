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
from saeshare.render.heatmaps import CaptionMaps, TokenMaps, overlay, word_positions
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


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    import train_text
    from tiny_models import checkpoint_for

    root = tmp_path_factory.mktemp("heat_text")
    train_text.main(["--model", "Bert", "--bert_model_name", checkpoint_for("Bert", root), "--runname", "b",
                     "--root", str(root), "--max_samples", "40", "--batch_size", "8", "--expansion_factor", "4",
                     "--top_k", "8", "--layers", "1", "--lr", "1e-3"])
    return Run.open(root, "b")


def test_caption_heat_is_the_sae_on_each_words_tokens(bert_run):
    """Brute force: the tokeniser's own character offsets say which tokens make each word."""
    maps = CaptionMaps(bert_run, 1)
    sae = bert_run.sae(1)
    W, b = sae.W_enc.double().numpy(), sae.b_dec.double().numpy()
    for n in (0, 3, 17):
        caption = maps.ds.caption(n)
        enc = maps.encoder.tokenizer(caption, return_offsets_mapping=True)
        inputs = maps.encoder.collate([caption])
        codes_TF = np.maximum((maps.encoder.record(inputs, [1])[1][0].double().numpy() - b) @ W, 0)
        starts = [m.start() for m in re.finditer(r"\S+", caption)]
        ends = [m.end() for m in re.finditer(r"\S+", caption)]
        for f in (0, 5, 20):
            spans = list(enumerate(enc["offset_mapping"]))
            brute = [max((codes_TF[t, f] for t, (s, e) in spans if e > s and s >= a and e <= z), default=0.0)
                     for a, z in zip(starts, ends)]
            np.testing.assert_allclose(maps.heat(n, f), brute, rtol=1e-4, atol=1e-5)


def test_clip_text_words_cover_every_caption_token(tmp_path):
    from tiny_models import open_clip_dir
    from wrappedmodels import ClipText

    enc = ClipText(str(open_clip_dir(tmp_path / "oc")))
    for caption in ("a red star, on a blue background", "Two  dogs-running at dusk!"):
        ids_T = enc.collate([caption])["text"][0].tolist()
        where = word_positions(ids_T, [enc.word_ids(w) for w in caption.split()])
        assert [p for ps in where for p in ps] == list(range(1, ids_T.index(max(ids_T))))  # between SOT and EOT


def test_word_positions_skip_what_is_not_there():
    assert word_positions([101, 7, 8, 9, 102], [[7], [42], [8, 9]]) == [[1], [], [2, 3]]
    assert word_positions([101, 7, 102], [[7], [7]]) == [[1], []]  # the second one was cut off by truncation


def test_text_gallery_shades_the_words(bert_run, tmp_path):
    base = ["--run", "b", "--root", str(bert_run.path.parent), "--layer", "1", "--device", "cpu", "--min_active", "1",
            "--max_features", "3"]
    show.main([*base, "--out", str(tmp_path / "plain")])
    show.main([*base, "--out", str(tmp_path / "heat"), "--heatmaps"])
    plain = {g.name: np.asarray(Image.open(g)).astype(int) for g in (tmp_path / "plain").glob("*.jpg")}
    heated = {g.name: np.asarray(Image.open(g)).astype(int) for g in (tmp_path / "heat").glob("*.jpg")}
    assert plain.keys() == heated.keys() and len(plain) == 3
    top = slice(show.PAD, show.PAD + show.TILE)  # the images themselves are left as they are
    for name in plain:
        assert np.abs(plain[name][top, top] - heated[name][top, top]).mean() < 1
    assert any(np.abs(plain[n] - heated[n]).mean() > 0.5 for n in plain)  # the captions are shaded
