"""steer.py on a tiny random Stable Diffusion pipeline: the hook adds exactly what it says, alpha 0 is the pipeline
itself, the files and page are written, discovery and causal matches agree with the images re-scored, bad input
is one line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import steer
import train_image
import train_text
import wmppc
from saeshare.disk.runs import Run
from saeshare.steer.pipeline import layer_rows, load_pipeline, steering, tower_of
from saeshare.steer.scores import VisionFeatures, rise
from test_show import CHROMIUM, chromium
from tiny_models import open_clip_dir, sd_pipeline_dir

SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pipeline, an SDText run on it and a tiny CLIP vision run over the same 40 shapes."""
    tmp = tmp_path_factory.mktemp("steer")
    pipe_dir, clip_dir, root = sd_pipeline_dir(tmp / "sd"), open_clip_dir(tmp / "clip"), tmp / "runs"
    common = ["--root", str(root), "--dataset", "shapes", "--max_samples", "40", "--batch_size", "8",
              "--expansion_factor", "4", "--top_k", "4", "--device", "cpu"]
    train_text.main(["--model", "SDText", "--sd_model_name", str(pipe_dir), "--runname", "sd", "--layers", "1", "2",
                     *common])
    train_image.main(["--model", "ClipVision", "--clip_model_name", str(clip_dir), "--runname", "clip", *common])
    run = Run.open(root, "sd")
    n_active_F = (run.dense_codes(2, "topk") > 0).sum(0)
    firing = [int(f) for f in torch.argsort(-n_active_F)[:2]]
    return dict(pipe=str(pipe_dir), clip=str(clip_dir), root=root, run=run, firing=firing,
                silent=int(torch.nonzero(n_active_F == 0)[0]))


def base(world, out: Path, *extra: str) -> list[str]:
    return ["--pipeline", world["pipe"], "--run", "sd", "--root", str(world["root"]), "--layer", "2",
            "--out", str(out), *SMALL, *extra]


def _block_outputs(tower, ids, layers):
    """Each block's output as the next block receives it (hooks registered after the steering one see its
    change; transformers' own hidden_states are recorded before it)."""
    seen = {}
    handles = [tower.blocks[i].register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone())) for i in layers]
    out = tower.text_encoder(ids).last_hidden_state
    for h in handles:
        h.remove()
    return seen, out


def test_hook_adds_exactly_the_vector_at_the_chosen_layer(world):
    pipe = load_pipeline(world["pipe"], torch.device("cpu"), torch.float32)
    tower = tower_of(pipe, 1)
    ids = tower.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    v_D = torch.randn(32, generator=torch.Generator().manual_seed(1))
    plain, plain_out = _block_outputs(tower, ids, [1, 2])
    for positions in ("all", "eot"):
        with steering(tower, 2, v_D, positions):
            steered, out = _block_outputs(tower, ids, [1, 2])
        torch.testing.assert_close(steered[1], plain[1], rtol=0, atol=0)  # blocks before it: unchanged
        added = (steered[2] - plain[2]).double()
        eot = (ids == 49407).int().argmax(1)
        where = torch.ones(ids.shape, dtype=torch.bool) if positions == "all" else \
            torch.arange(77)[None] == eot[:, None]
        torch.testing.assert_close(added[where], v_D.double().expand(int(where.sum()), -1), rtol=0, atol=1e-6)
        assert added[~where].abs().max() == 0 if positions == "eot" else True
        assert (out - plain_out).abs().max() > 1e-3  # and the change reaches the encoder's output
    after, after_out = _block_outputs(tower, ids, [2])
    torch.testing.assert_close(after_out, plain_out, rtol=0, atol=0)  # the hook is gone


def test_pipeline_recomputes_the_runs_rows(world):
    pipe = load_pipeline(world["pipe"], torch.device("cpu"), torch.float32)
    run = world["run"]
    import data

    ds = data.from_description(run.meta.dataset)
    rows = layer_rows(tower_of(pipe, 1), 1, [ds.caption(n) for n in range(5)], "eot")
    np.testing.assert_allclose(rows.numpy(), run.acts(1)[:5], rtol=1e-4, atol=1e-5)


def test_steer_writes_images_json_and_page_and_alpha_zero_is_the_pipeline(world, tmp_path, capsys):
    out = tmp_path / "out"
    report = steer.main(base(world, out, "--features", *map(str, world["firing"]), "--alphas", "-4", "0", "4",
                             "--prompts", *PROMPTS, "--seeds", "0", "1"))
    assert "wrote" in capsys.readouterr().out
    saved = json.loads((out / "steer.json").read_text())
    assert saved["kind"] == "steer" and saved["alphas"] == [-4.0, 0.0, 4.0]
    images = saved["images"]
    assert len(images) == 2 * 2 * (1 + 2 * 2) == len(report.images)  # plain + 2 features x 2 nonzero alphas
    assert all((out / im["file"]).is_file() for im in images)
    assert {(im["feature"], im["alpha"]) for im in images} >= {(world["firing"][0], -4.0), (None, 0.0)}
    assert all((im["text_change"] == 0) == (im["alpha"] == 0) for im in images)
    pipe = load_pipeline(world["pipe"], torch.device("cpu"), torch.float32)
    for im in images:
        if im["alpha"] == 0:  # the pipeline called plainly, bit for bit
            ref = pipe(im["prompt"], num_inference_steps=2, height=64, width=64, guidance_scale=7.5,
                       generator=torch.Generator("cpu").manual_seed(im["seed"])).images[0]
            assert np.array_equal(np.asarray(Image.open(out / im["file"])), np.asarray(ref))
    plain = {(im["prompt"], im["seed"]): np.asarray(Image.open(out / im["file"])).astype(int)
             for im in images if im["alpha"] == 0}
    for im in images:
        if im["alpha"] != 0:
            steered = np.asarray(Image.open(out / im["file"])).astype(int)
            assert np.abs(steered - plain[im["prompt"], im["seed"]]).max() > 0
    page = (out / "index.html").read_text()
    # per feature: prompts x alphas x seeds
    assert page.count('<section class="feature"') == 2 and page.count("<img ") == 2 * (2 * 3 * 2)
    assert not list(tmp_path.glob(".out*"))  # built aside, renamed into place


def test_both_branches_changes_the_negative_embeds_only_when_asked(world):
    from saeshare.steer.pipeline import conditioning

    pipe = load_pipeline(world["pipe"], torch.device("cpu"), torch.float32)
    tower = tower_of(pipe, 1)
    v_D = torch.randn(32, generator=torch.Generator().manual_seed(2))  # not constant: LayerNorm removes a mean
    one = conditioning(pipe, "a dog", torch.device("cpu"), lambda: steering(tower, 2, v_D))
    both = conditioning(pipe, "a dog", torch.device("cpu"), lambda: steering(tower, 2, v_D), both_branches=True)
    torch.testing.assert_close(one.embeds["prompt_embeds"], both.embeds["prompt_embeds"])
    assert one.change > 0.01
    assert not torch.equal(one.embeds["negative_prompt_embeds"], both.embeds["negative_prompt_embeds"])


def test_discover_names_features_as_the_images_rescored_say(world, tmp_path, capsys):
    out = tmp_path / "d"
    report = steer.main(base(world, out, "--discover", "--top", "2", "--alphas", "0", "8", "--score_run", "clip",
                             "--labels", "red", "blue", "circle", "--clip_model_name", world["clip"],
                             "--n_random", "2"))
    printed = capsys.readouterr().out
    disc = json.loads((out / "discover.json").read_text())
    assert disc["kind"] == "steer_discover" and len(disc["features"]) == 2 and disc["prompts"] == steer.DISCOVER_PROMPTS
    scorer = VisionFeatures(Run.open(world["root"], "clip"), None, "cpu")
    def images(feature, direction="feature"):
        return [Image.open(out / im.file).convert("RGB") for im in report.images
                if im.feature == feature and im.direction == direction]

    plain = scorer(images(None))
    for feat in report.features:
        assert [n.scorer for n in feat.names] == ["clip layer 1", f"labels ({Path(world['clip']).name})"]
        rise_C = rise(scorer(images(feat.feature)), plain)
        randoms = [rise(scorer(images(feat.feature, f"random {r}")), plain) for r in range(2)]
        name = feat.names[0]
        assert name.name == f"clip #{int(np.argmax(rise_C))}"
        assert name.rise == pytest.approx(rise_C.max(), abs=1e-6)
        assert name.floor == pytest.approx(max(r.max() for r in randoms), abs=1e-6)
        assert f"{feat.feature:>8}  clip layer 1" in printed


def test_match_measures_the_wmppc_match_against_random_directions(world, tmp_path, capsys):
    match = tmp_path / "m.json"
    wmppc.main(["--source", "sd", "--target", "clip", "--root", str(world["root"]), "--json", str(match),
                "--device", "cpu"])
    report = steer.main(base(world, tmp_path / "o", "--match", str(match), "--top", "2", "--alphas", "0", "8",
                             "--prompts", *PROMPTS, "--n_random", "2"))
    printed = capsys.readouterr().out
    from saeshare.engine.correlator import Correlator

    stats = Correlator().pair_stats(world["run"], Run.open(world["root"], "clip"), [(2, 1)])[2, 1]
    assert report.match_target == "clip layer 1" and len(report.matches) == 2
    fires_F = (world["run"].dense_codes(2, "topk") > 0).any(0).numpy()
    best = np.argsort(-np.where(fires_F, stats.rho_F, -np.inf), kind="stable")[:2]
    assert [m.feature for m in report.matches] == [int(f) for f in best]
    for m in report.matches:
        assert m.vision_feature == int(stats.match_F[m.feature]) and m.rho == pytest.approx(stats.rho_F[m.feature])
        assert m.ratio == pytest.approx(m.rise / m.floor) if m.floor > 0 else np.isnan(m.ratio)
    assert "matched features in clip layer 1" in printed and "ratio" in printed


def test_bad_input_is_one_line(world, tmp_path, error_line):
    out = tmp_path / "x"
    args = base(world, out, "--prompts", "a dog")
    n_features = world["run"].n_features(2)
    assert f"has {n_features} features" in error_line(steer.main, [*args, "--features", str(n_features)])
    assert "layer 0 is not recorded" in error_line(steer.main, [*args, "--features", "1", "--layer", "0"])
    assert "never fires" in error_line(steer.main, [*args, "--features", str(world["silent"])])
    assert "--discover needs a scorer" in error_line(steer.main, [*args, "--discover"])
    msg = error_line(steer.main, [*args, "--discover", "--labels", "x"])
    assert "--labels and --clip_model_name go together" in msg
    # another text encoder of the same shape
    other = sd_pipeline_dir(tmp_path / "other")
    with torch.no_grad():
        from diffusers import DiffusionPipeline

        p = DiffusionPipeline.from_pretrained(other)
        for w in p.text_encoder.parameters():
            w.add_(torch.randn_like(w))
        p.save_pretrained(other)
    f = str(world["firing"][0])
    msg = error_line(steer.main, [*base(world, out, "--features", f, "--prompts", "a"), "--pipeline", str(other)])
    assert "made on another text encoder" in msg
    train_text.main(["--model", "Bert", "--bert_model_name", "all-MiniLM-L6-v2", "--runname", "bert", "--root",
                     str(world["root"]), "--dataset", "shapes", "--max_samples", "40", "--layers", "1",
                     "--expansion_factor", "2", "--top_k", "4", "--device", "cpu"])
    msg = error_line(steer.main, [*args, "--features", "1", "--run", "bert", "--layer", "1"])
    assert "was made on Bert" in msg
    assert "no text_encoder_2 folder" in error_line(train_text.main, [
        "--model", "SDText", "--sd_model_name", world["pipe"], "--sd_text_encoder", "2", "--runname", "two",
        "--root", str(tmp_path), "--dataset", "shapes", "--max_samples", "8"])
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in error_line(steer.main, [*args, "--features", f])
    assert (out / "keep.txt").read_text() == "mine"


def test_second_tower_is_named_in_the_checkpoint():
    import argparse

    from wrappedmodels import SDText, split_sd_checkpoint

    p = argparse.ArgumentParser()
    p.add_argument("--sd_model_name")
    SDText.extra_flags(p)
    ckpt = SDText.checkpoint_from(p.parse_args(["--sd_model_name", "stabilityai/sdxl", "--sd_text_encoder", "2"]))
    assert ckpt == "stabilityai/sdxl#2" and split_sd_checkpoint(ckpt) == ("stabilityai/sdxl", 2)
    assert split_sd_checkpoint("/a/b") == ("/a/b", 1)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_in_headless_chromium(world, tmp_path):
    out = tmp_path / "p"
    steer.main(base(world, out, "--features", str(world["firing"][0]), "--alphas", "-4", "0", "4",
                    "--prompts", *PROMPTS))
    url = (out / "index.html").resolve().as_uri()
    dom = chromium(["--dump-dom", url], tmp_path)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    assert loaded == int(re.search(r'data-images-total="(\d+)"', dom).group(1)) == 2 * 3
    shot = tmp_path / "shot.png"
    chromium([f"--screenshot={shot}", "--window-size=1200,900", url], tmp_path)
    assert Image.open(shot).size == (1200, 900)
