"""Typed, versioned files (docs/design.md#runs-on-disk, #versioned-files), flags from config dataclasses, and the
boundaries that must
say the right thing: schema migration and refusal, library vs command-line option names, the
encoder registry, and loader errors that are not network errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import show
import wmppc
import wrappedmodels
from errors import OptionError, UserError
from saeshare.disk.files import Record
from saeshare.disk.results import SharednessReport, Wmppc, WmppcTable
from saeshare.disk.runs import Run
from saeshare.engine.options import EngineOptions
from synthetic import engine, make_run, random_sae_state


@pytest.fixture
def run_pair(tmp_path):
    rng = np.random.default_rng(0)
    acts = {1: rng.normal(size=(40, 6)).astype(np.float32)}
    for name, seed in (("A", 1), ("B", 2)):
        make_run(tmp_path, name, acts, {1: random_sae_state(6, 12, seed=seed)})
    return tmp_path


def test_schema_1_run_json_is_migrated(run_pair):
    path = run_pair / "A" / "run.json"
    meta = json.loads(path.read_text())
    assert meta["schema"] == 2 and meta["kind"] == "run"
    for key in ("kind", "n_layers_model", "acts_dtype", "image_size", "versions", "device"):
        meta.pop(key, None)
    meta["sae"].pop("seeds")
    meta["schema"] = 1
    meta["layer_info"] = {"1": {"d_model": 6, "n_features": 12}}  # no metrics, as schema-1 synthetic runs
    path.write_text(json.dumps(meta))
    run = Run.open(run_pair, "A")
    assert run.meta.acts_dtype == "float32" and run.meta.n_layers_model is None and run.meta.layer_info[1].fvu is None
    assert run.n_samples == 40 and run.layers == [1] and run.meta.sae.top_k == 4 and run.meta.sae.seeds == [0]


@pytest.mark.parametrize("edit,needle", [
    (lambda m: {**m, "schema": 99}, "schema 99, this version reads schema 2"),
    (lambda m: {**m, "kind": "wmppc"}, "a 'wmppc' file, not a 'run' file"),
    (lambda m: {k: v for k, v in m.items() if k != "layers"}, "missing key 'layers'"),
    (lambda m: {**m, "layers": "all"}, "layers: a list expected"),
    (lambda m: {**m, "modality": "audio"}, "modality: one of 'image', 'text' expected"),
])
def test_bad_run_json_is_one_line(run_pair, error_line, edit, needle):
    path = run_pair / "B" / "run.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    line = error_line(wmppc.main, ["--root", str(run_pair), "--source", "A", "--target", "B"])
    assert "corrupt" in line and str(path) in line and needle in line


def test_result_records_round_trip(run_pair, tmp_path):
    res = wmppc.wmppc(Run.open(run_pair, "A"), Run.open(run_pair, "B"), engine("relu", no_cache=True))
    res.save(tmp_path / "w.json")
    again = Wmppc.load(tmp_path / "w.json")
    np.testing.assert_array_equal(again.layer_matrix, res.layer_matrix)
    assert (again.all_layers, again.source_layers, again.codes) == (res.all_layers, res.source_layers, "relu")
    table = WmppcTable(["A", "B"], "relu", np.array([[np.nan, 0.5], [0.25, np.nan]]), np.eye(2))
    table.save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["all_layers"] == [[None, 0.5], [0.25, None]]  # NaN -> null
    back = WmppcTable.load(tmp_path / "t.json")
    assert math.isnan(back.all_layers[0, 0]) and back.all_layers[1, 0] == 0.25
    with pytest.raises(UserError, match="not a comp_sharedness.py --json output .a 'wmppc_table' file"):
        SharednessReport.load(tmp_path / "t.json")


def test_every_record_kind_is_distinct_and_versioned():
    kinds = {}
    for cls in Record.__subclasses__():
        assert isinstance(cls.SCHEMA, int) and cls.KIND not in kinds
        kinds[cls.KIND] = cls
    assert {"run", "wmppc", "wmppc_table", "comp_sharedness", "demo"} <= set(kinds)


def test_option_errors_name_fields_in_the_library_and_flags_on_the_command_line(run_pair, error_line):
    with pytest.raises(OptionError, match=r"^chunk_size must be positive, got 0$"):
        EngineOptions(chunk_size=0)
    assert "error: --chunk_size must be positive, got 0" == error_line(
        wmppc.main, ["--root", str(run_pair), "--source", "A", "--target", "B", "--chunk_size", "0"])
    with pytest.raises(OptionError, match=r"^unknown codes 'dense'; choose from relu, topk$"):
        EngineOptions(codes="dense")


def test_flags_carry_the_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        show.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--min_active MIN_ACTIVE Skip features active on fewer samples. (default: 16)" in out
    assert "--chunk_size CHUNK_SIZE Samples per chunk." in out and "--no_cache" not in out  # show has no cache


def test_registering_a_family_twice_is_an_error():
    with pytest.raises(ValueError, match="'Bert' is registered twice"):
        wrappedmodels.register(type("Bert", (wrappedmodels.Encoder,), {}))
    assert wrappedmodels.ENCODERS["Bert"].checkpoint_flag == "--bert_model_name"  # the first one stays


def test_only_network_errors_read_as_offline(monkeypatch):
    def buggy(self):
        raise TypeError("unexpected keyword argument 'foo'")

    monkeypatch.setattr(wrappedmodels.Bert, "load", buggy)
    with pytest.raises(TypeError, match="foo"):  # a bug surfaces as itself, not as "needs network"
        wrappedmodels.Bert("all-MiniLM-L6-v2")
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            raise LocalEntryNotFoundError("not in the cache")
        except LocalEntryNotFoundError as e:
            raise OSError("cannot load") from e
    except OSError as e:
        assert wrappedmodels.is_network_error(e)
    assert not wrappedmodels.is_network_error(OSError("bad safetensors header"))
    assert not wrappedmodels.is_network_error(KeyError("W_enc"))


def test_missing_local_checkpoint_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint folder"):
        wrappedmodels.Bert(str(tmp_path / "nope"))


def test_nan_in_stored_activations_is_named(run_pair, error_line):
    acts = np.load(run_pair / "B" / "layer01.acts.npy")
    acts[17, 3] = np.nan
    np.save(run_pair / "B" / "layer01.acts.npy", acts)
    line = error_line(wmppc.main, ["--root", str(run_pair), "--source", "A", "--target", "B", "--no_cache"])
    assert "run 'B' layer 1: NaN or inf in the stored activations of sample 17" in line


def test_shapes_beyond_memory_is_refused(tmp_path, error_line):
    import train_image

    line = error_line(train_image.main, ["--model", "EfficientNetLite", "--runname", "x", "--root", str(tmp_path),
                                         "--max_samples", "100000000"])
    assert "shapes makes at most 1,000,000 samples" in line


def test_nan_from_the_encoder_names_layer_and_sample(tmp_path, error_line, monkeypatch):
    import train_text
    from tiny_models import checkpoint_for

    record = wrappedmodels.Encoder.record

    def poisoned(self, inputs, layers):
        out = record(self, inputs, layers)
        out[layers[0]][1, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(wrappedmodels.Encoder, "record", poisoned)
    line = error_line(train_text.main, ["--model", "Bert", "--bert_model_name", checkpoint_for("Bert", tmp_path),
                                        "--runname", "x", "--root", str(tmp_path), "--max_samples", "6",
                                        "--no-shuffle", "--batch_size", "3", "--layers", "1"])
    assert "layer 1: NaN or inf in the encoder's activations of sample 1 (id 'seed0/1')" in line
    assert not (tmp_path / "x").exists()


def test_every_file_of_a_run_has_the_umask_permissions(tmp_path):
    """safetensors writes 0600; a run's SAEs must be as readable as its run.json (a shared group folder)."""
    import os
    import stat

    from synthetic import make_run, random_sae_state

    run = make_run(tmp_path, "R", {0: np.zeros((20, 4), np.float32) + np.arange(20)[:, None]},
                   {0: random_sae_state(4, 8)})
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in run.path.iterdir()}
    mask = os.umask(0)
    os.umask(mask)
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_flags_are_not_abbreviated_and_a_run_name_holds_no_seed(tmp_path, error_line):
    import wmppc
    from saeshare.disk.runs import RunWriter

    assert "unrecognized arguments: --sourc" in error_line(wmppc.main, ["--sourc", "A", "--target", "B"])
    with pytest.raises(UserError, match="'@' addresses an SAE seed"):
        RunWriter(tmp_path, "v@1")
