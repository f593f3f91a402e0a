"""What a new user hit: datasets found by content, one line for every bad input and full disk, one
writer per run name, SAE warnings a line per run, progress in logs, notes where a number needs one."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import show
import train_image
import wmppc
from errors import UserError
from sae import SaeConfig, SaeTrainer
from saeshare.core import progress as progress_mod
from saeshare.disk import runs as runs_mod
from saeshare.disk.cache import pair_cache
from saeshare.disk.files import staged_dir
from saeshare.disk.runs import LayerInfo, Run, RunWriter, summary_warning
from saeshare.render.sections import Text, page
from synthetic import make_run, random_sae_state
from test_data import write_folder

ROOT_DIR = Path(__file__).resolve().parents[1]


def tiny_image_run(root: Path, folder: Path, name: str = "f", *extra: str) -> Run:
    train_image.main(["--model", "EfficientNetLite", "--runname", name, "--root", str(root), "--dataset", str(folder),
                      "--image_size", "32", "--layers", "0", "--device", "cpu", *extra])
    return Run.open(root, name)


# ---- 1. a folder dataset is its content, wherever it lies ----------------------------------------------
def test_folder_fingerprint_is_content_not_path(tmp_path):
    write_folder(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = data.load_dataset(str(tmp_path / "a")), data.load_dataset(str(tmp_path / "b"))
    assert a.name != b.name and a.fingerprint == b.fingerprint
    rows = [json.loads(line) for line in (tmp_path / "b" / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] += "!"
    (tmp_path / "b" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data.load_dataset(str(tmp_path / "b")).fingerprint != a.fingerprint  # a caption changed
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    with open(tmp_path / "c" / a.sample_ids[0], "ab") as f:
        f.write(b"\0")
    assert data.load_dataset(str(tmp_path / "c")).fingerprint != a.fingerprint  # an image's size changed


def test_moved_folder_is_found_with_data_root(tmp_path, error_line):
    write_folder(tmp_path / "imgs")
    run = tiny_image_run(tmp_path / "runs", tmp_path / "imgs")
    copy = tiny_image_run(tmp_path / "runs", shutil.copytree(tmp_path / "imgs", tmp_path / "node_local"), "g")
    assert copy.fingerprint == run.fingerprint  # the same samples: comparable
    wmppc.main(["--root", str(tmp_path / "runs"), "--source", "f", "--target", "g", "--device", "cpu"])
    (tmp_path / "imgs").rename(tmp_path / "moved")
    argv = ["--run", "f", "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "gal"), "--device", "cpu"]
    assert "--data_root" in error_line(show.main, argv)
    show.main([*argv, "--data_root", str(tmp_path / "moved")])
    assert (tmp_path / "gal" / "index.html").is_file()
    ds = show.Samples(run).ds  # tiles are named by file, not by row
    assert [ds.short_name(i) for i in range(len(ds))] == ds.sample_ids and ds.sample_ids[0].endswith(".png")
    data.relocate(None)


def test_runs_fingerprinted_by_path_still_open(tmp_path):
    write_folder(tmp_path / "imgs")
    ds = data.load_dataset(str(tmp_path / "imgs"))
    old = data.DatasetInfo(ds.name, ds.split, len(ds), data.fingerprint(ds.name, ds.split, ds.sample_ids))
    assert data.from_description(old).sample_ids == ds.sample_ids


def test_files_that_are_not_images_are_one_line(tmp_path):
    write_folder(tmp_path / "imgs")
    meta = tmp_path / "imgs" / "metadata.jsonl"
    (tmp_path / "imgs" / "notes.txt").write_text("hello")
    meta.write_text(meta.read_text() + json.dumps({"file_name": "notes.txt", "text": "a note"}) + "\n")
    with pytest.raises(UserError, match="not images: notes.txt"):
        data.load_dataset(str(tmp_path / "imgs"))
    write_folder(tmp_path / "broken")
    (tmp_path / "broken" / "img0.png").write_bytes(b"not a png")
    ds = data.load_dataset(str(tmp_path / "broken"))
    with pytest.raises(UserError, match="img0.png.*not a readable image"):
        ds.image(ds.sample_ids.index("img0.png"))


# ---- 3. SAE steps recorded; problems one line per run ---------------------------------------------------
def test_steps_and_fvu_fall_against_the_batches(tmp_path):
    """fvu_fall is 1 - FVU(last fifth of steps) / FVU(the fifth before), each FVU a sum of the batches' squared
    errors over the sum of their variances, recomputed here in float64 from the SAE's own outputs."""
    cfg = SaeConfig(top_k=4, expansion_factor=2, lr=1e-2)
    trainer = SaeTrainer(8, cfg, seed=0)
    forward, seen = trainer.sae.forward, []

    def spy(x, *args):
        out = forward(x, *args)
        x64 = x.double()
        seen.append(((x64 - out.x_hat.double()).pow(2).sum().item(), (x64 - x64.mean(0)).pow(2).sum().item()))
        return out

    trainer.sae.forward = spy
    gen = torch.Generator().manual_seed(0)
    for _ in range(23):
        trainer.train_step(torch.randn(16, 8, generator=gen) * 3 + 1)
    m = trainer.metrics()
    err, var = np.array(seen).T
    prev, last = slice(23 - 8, 23 - 4), slice(23 - 4, 23)
    assert m.steps == 23
    assert m.fvu_fall == pytest.approx(1 - (err[last].sum() / var[last].sum()) / (err[prev].sum() / var[prev].sum()),
                                       rel=1e-9)
    assert SaeTrainer(8, cfg).metrics().fvu_fall is None  # under 10 steps


def _run_with(tmp_path, name, infos: dict[int, LayerInfo]) -> Run:
    state = {layer: random_sae_state(6, 12, seed=layer) for layer in infos}
    run = make_run(tmp_path, name, {layer: np.random.default_rng(0).normal(size=(30, 6)).astype(np.float32)
                                    for layer in infos}, state)
    meta = json.loads((run.path / "run.json").read_text())
    for layer, info in infos.items():
        meta["layer_info"][str(layer)].update({k: v for k, v in vars(info).items()
                                               if v is not None and k != "per_seed"})
    (run.path / "run.json").write_text(json.dumps(meta))
    return Run.open(tmp_path, name)


def test_sae_problems_are_one_line_per_run(tmp_path):
    ok = _run_with(tmp_path, "ok", {0: LayerInfo(6, 12, steps=500, fvu_fall=0.01, fvu_pooled=0.3)})
    assert summary_warning(ok) is None
    bad = _run_with(tmp_path, "bad", {0: LayerInfo(6, 12, steps=3, fvu_pooled=4.0),
                                      1: LayerInfo(6, 12, steps=3, fvu_pooled=0.5),
                                      2: LayerInfo(6, 12, steps=400, fvu_fall=0.3, fvu_pooled=0.5)})
    line = summary_warning(bad)
    assert line.startswith("warning: run 'bad': its SAEs took 3 steps (fewer than 100) at layers 0, 1;")
    assert "were still improving when training ended (FVU down 30% over the last fifth) at layer 2" in line
    assert "(fvu_pooled 4.00) at layer 0" in line and "--lr" in line and "--sae_tokens pooled" in line
    assert len(runs_mod.run_warnings(bad)) == 4 and "\n" not in line


# ---- 4. one line, never a traceback ------------------------------------------------------------------
def test_bad_paths_and_sizes_are_one_line(tmp_path, error_line):
    write_folder(tmp_path / "imgs")
    tiny_image_run(tmp_path / "runs", tmp_path / "imgs")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    pair = ["--source", "f", "--target", "f", "--device", "cpu"]
    assert "is a file" in error_line(wmppc.main, [*pair, "--root", str(tmp_path / "afile")])
    assert "is a folder" in error_line(wmppc.main, [*pair, "--root", str(tmp_path / "runs"), "--json",
                                                    str(tmp_path / "adir")])
    base = ["--model", "EfficientNetLite", "--runname", "x", "--root", str(tmp_path / "runs"), "--max_samples", "4",
            "--device", "cpu"]
    assert "--image_size must be positive" in error_line(train_image.main, [*base, "--image_size", "0"])
    msg = error_line(train_image.main, [*base, "--image_size", "32", "--layers", "0", "--top_k", "100000"])
    assert "--top_k 100000 is more than the" in msg and "features of layer 0" in msg
    assert "has no CLS token" in error_line(train_image.main, [*base, "--token", "cls"])
    assert not (tmp_path / "runs" / "x").exists()


def test_width_mismatch_between_sae_and_acts(tmp_path):
    run = make_run(tmp_path, "w", {0: np.zeros((10, 6), np.float32)}, {0: random_sae_state(6, 12)})
    np.save(run.path / "layer00.acts.npy", np.zeros((10, 5), np.float32))
    with pytest.raises(UserError, match="reads width 6, its stored activations have width 5"):
        Run.open(tmp_path, "w").sae(0)


def test_full_disk_is_one_line_and_keeps_what_was_there(tmp_path, error_line, monkeypatch):
    write_folder(tmp_path / "imgs")
    run = tiny_image_run(tmp_path / "runs", tmp_path / "imgs")
    before = {p.name: p.read_bytes() for p in run.path.iterdir()}

    def full(*args, **kwargs):  # what safetensors raises on a full disk
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(runs_mod, "save_file", full)
    argv = ["--model", "EfficientNetLite", "--runname", "f", "--root", str(tmp_path / "runs"), "--dataset",
            str(tmp_path / "imgs"), "--image_size", "32", "--layers", "0", "--device", "cpu", "--overwrite"]
    assert "No space left on device" in error_line(train_image.main, argv)
    assert {p.name: p.read_bytes() for p in run.path.iterdir()} == before
    monkeypatch.undo()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json") and "runs" not in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "w.json"
    line = error_line(wmppc.main, ["--root", str(tmp_path / "runs"), "--source", "f", "--target", "f", "--json",
                                   str(out), "--device", "cpu"])
    assert "No space left on device" in line and "intact" in line and not out.exists()


# ---- 5. one writer per run name --------------------------------------------------------------------------
def test_second_writer_of_a_name_is_refused_and_a_killed_one_frees_it(tmp_path):
    with staged_dir(tmp_path / "r", lambda final: None) as tmp:
        (tmp / "work").write_text("first")
        with pytest.raises(UserError, match=r"is being written by pid \d+ on .*: wait for it"):
            with RunWriter(tmp_path, "r"):
                pass
        assert (tmp / "work").read_text() == "first"  # the first writer's staging is untouched
    assert not list(tmp_path.glob(".r.*"))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.');"
                               "from saeshare.disk.files import staged_dir\n"
                               f"with staged_dir({str(tmp_path / 'k')!r}, lambda f: None):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT_DIR, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match="is being written by"):
        with RunWriter(tmp_path, "k"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with staged_dir(tmp_path / "k", lambda final: None) as tmp:  # the lock died with its process
        (tmp / "x").write_text("mine")
    assert (tmp_path / "k" / "x").read_text() == "mine" and not list(tmp_path.glob(".k.*"))


# ---- 7. progress in logs ----------------------------------------------------------------------------------
def test_log_lines_every_5_percent_and_every_minute(monkeypatch, capsys):
    clock = iter(range(0, 10 ** 6, 5))  # 5 s an item: 5% (10 items) in 50 s
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    for _ in progress_mod.LogLines(range(200), desc="train", unit="batch"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 20 and all(line.startswith("progress train: ") for line in lines)
    assert lines[0].startswith("progress train: 10/200 batch (5%)") and "ETA" in lines[0]
    assert lines[-1].startswith("progress train: 200/200 batch (100%)")
    minutes = iter(range(0, 10 ** 6, 61))
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(minutes))
    bar = progress_mod.LogLines(total=0, desc="correlations", unit="chunk")
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert len(capsys.readouterr().err.splitlines()) == 3  # no total: one line a minute
    quick = (t / 4 for t in range(10 ** 6))  # 0.25 s an item: 5% (10 items) in 2.5 s
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(quick))
    for _ in progress_mod.LogLines(range(200), desc="fast", unit="batch"):
        pass
    lines = capsys.readouterr().err.splitlines()  # never two lines within 10 s: at 40, 80, ..., 200
    assert [line.split()[2] for line in lines] == ["40/200", "80/200", "120/200", "160/200", "200/200"]


def test_terminal_keeps_its_bar(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not isinstance(progress_mod.progress(range(3)), progress_mod.LogLines)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress_mod.progress(range(3)), progress_mod.LogLines)


# ---- 10, 11, 12 ----------------------------------------------------------------------------------------
def test_same_run_and_missing_ceiling_are_said(tmp_path, capsys):
    make_run(tmp_path, "A", {0: np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)},
             {0: random_sae_state(6, 12)})
    wmppc.main(["--root", str(tmp_path), "--source", "A", "--target", "A", "--calibrate", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "same SAE (A): every feature matches itself, so wMPPC is 1 by construction" in out
    assert "no ceiling for A: a ceiling compares two SAE seeds of one run, and it has one" in out


def test_help_shows_a_default_of_zero(capsys):
    with pytest.raises(SystemExit):
        train_image.main(["--help"])
    assert "(default: 0)" in " ".join(capsys.readouterr().out.split())


def test_backticks_become_code_in_html():
    html = page("t", [Text("pass `--root demo_out/sae_features` <here>"), Text("one ` alone")])
    assert "<code>--root demo_out/sae_features</code> &lt;here&gt;" in html and "one ` alone" in html


def test_tile_font_draws_greek_and_cyrillic():
    font = show._font()
    assert Path(font.path).name == "DejaVuSans.ttf"

    def drawn(ch: str) -> bytes:
        im = Image.new("L", (40, 40))
        ImageDraw.Draw(im).text((5, 5), ch, fill=255, font=font)
        return im.tobytes()

    notdef = drawn("\U0010FFFD")  # a private-use code point: the font's "missing" box
    for ch in "aαЖé":
        assert drawn(ch) != notdef, ch


def test_torchrun_without_run_id_names_the_cause(tmp_path, monkeypatch):
    from saeshare.core import distributed
    from synthetic import engine

    a = make_run(tmp_path, "A", {0: np.ones((8, 6), np.float32)}, {0: random_sae_state(6, 12)})
    meta = json.loads((a.path / "run.json").read_text())
    meta["run_id"] = ""
    (a.path / "run.json").write_text(json.dumps(meta))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    run = Run.open(tmp_path, "A")
    with pytest.raises(UserError, match="run A has no run_id .* train or record it again"):
        engine("relu")._my_share(run, run, [0], [0], pair_cache(run, run, True))


def test_demo_image_size_zero_is_refused(error_line):
    import demo

    assert "--image_size must be positive" in error_line(demo.main, ["--image_size", "0", "--out", "/nonexistent/x"])


def test_cache_on_a_full_disk_is_a_warning_line(tmp_path, monkeypatch, capsys):
    from saeshare.disk import cache

    make_run(tmp_path, "A", {0: np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)},
             {0: random_sae_state(6, 12)})
    make_run(tmp_path, "B", {0: np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)},
             {0: random_sae_state(6, 12, seed=1)})

    def full(path, arrays):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(cache, "_savez", full)
    wmppc.main(["--root", str(tmp_path), "--source", "A", "--target", "B", "--device", "cpu"])
    captured = capsys.readouterr()
    assert captured.out.startswith("All Layers : ")
    lines = [line for line in captured.err.splitlines() if "cache" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: could not write the cache") and "No space" in lines[0]
    assert not list((tmp_path / ".cache").glob("*.npz"))
