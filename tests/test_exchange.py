"""SAEs in and out, checked with the libraries' own code (SAELens, EleutherAI's sparsify), not with this
project's reading of their formats: what export.py writes, their loaders read to the same codes; what
their classes save, record.py --sae_file imports to the same codes and reconstructions."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import export
import record
import wmppc
from errors import UserError
from sae import TopKSAE
from saeshare.disk.runs import Run
from saeshare.exchange import formats
from synthetic import make_run, random_sae_state

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU; the eager one is the same sum
sae_lens = pytest.importorskip("sae_lens")
sparsify = pytest.importorskip("sparsify")

D, F, K = 16, 64, 4


def _x(n: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _dense(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    return sae.encode(x).dense(sae.n_features)


@pytest.fixture
def run(tmp_path):
    acts = _x(30).numpy()
    return make_run(tmp_path / "runs", "r", {0: acts, 2: acts * 0.5}, {0: random_sae_state(D, F, 0),
                                                                        2: random_sae_state(D, F, 1)}, top_k=K)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_is_read_by_the_library(run, tmp_path, fmt, capsys):
    out = tmp_path / fmt
    export.main(["--run", "r", "--root", str(run.path.parent), "--format", fmt, "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "layer00", "layer02"]
    x = _x(seed=1)
    for layer in (0, 2):
        ours = run.sae(layer)
        if fmt == "saelens":
            theirs = sae_lens.SAE.load_from_disk(str(out / f"layer{layer:02d}"))
            codes, x_hat = theirs.encode(x), theirs.decode(theirs.encode(x))
        else:
            theirs = sparsify.SparseCoder.load_from_disk(out / f"layer{layer:02d}")
            enc = theirs.encode(x)
            codes = torch.zeros(len(x), F).scatter_(1, enc.top_indices, enc.top_acts)
            x_hat = theirs.decode(enc.top_acts, enc.top_indices)
        torch.testing.assert_close(codes, _dense(ours, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_hat, ours(x).x_hat, atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert "| 0 | 64 |" in card and f"import {'SAE' if fmt == 'saelens' else 'SparseCoder'}" in card
    meta = formats.read(out / "layer02", fmt).metadata
    assert meta["hook_name"] == "blocks.2" and meta["dataset_fingerprint"] == run.fingerprint
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out} ({fmt}: 2 layers")


def test_export_refuses_to_overwrite(run, tmp_path, error_line):
    argv = ["--run", "r", "--root", str(run.path.parent), "--format", "sparsify", "--out", str(tmp_path / "o")]
    export.main(argv)
    before = (tmp_path / "o" / "layer00" / "sae.safetensors").read_bytes()
    assert "--overwrite" in error_line(export.main, argv)
    assert (tmp_path / "o" / "layer00" / "sae.safetensors").read_bytes() == before
    export.main([*argv, "--overwrite"])
    assert "unknown --format 'pickle'" in error_line(export.main, [*argv[:-4], "--format", "pickle", "--out", "x"])


def _saelens_made(folder, apply_b_dec: bool = True) -> torch.nn.Module:
    from sae_lens.saes.topk_sae import TopKSAE as LensTopK
    from sae_lens.saes.topk_sae import TopKSAEConfig

    sae = LensTopK(TopKSAEConfig(d_in=D, d_sae=F, k=K, apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    sae.save_model(folder)
    return sae


def _sparsify_made(folder) -> torch.nn.Module:
    sae = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(k=K, num_latents=F))
    with torch.no_grad():
        sae.encoder.bias.copy_(torch.randn(F, generator=torch.Generator().manual_seed(3)) * 0.3)
        sae.b_dec.copy_(torch.randn(D, generator=torch.Generator().manual_seed(4)))
    sae.save_to_disk(folder)
    return sae


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_sae_imports_to_the_same_codes(tmp_path, apply_b_dec):
    theirs = _saelens_made(tmp_path / "lens", apply_b_dec)
    got = formats.read(tmp_path / "lens")  # auto-detected
    x = _x(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(_dense(got.sae, x), theirs.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.sae(x).x_hat, theirs.decode(theirs.encode(x)), atol=1e-5, rtol=1e-5)


def test_sparsify_sae_imports_to_the_same_codes(tmp_path):
    theirs = _sparsify_made(tmp_path / "sp")
    got = formats.read(tmp_path / "sp", "sparsify")
    x = _x(seed=3)
    with torch.no_grad():
        enc = theirs.encode(x)
        codes = torch.zeros(len(x), F).scatter_(1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(_dense(got.sae, x), codes, atol=1e-5, rtol=1e-5)
        x_hat = theirs.decode(enc.top_acts, enc.top_indices)
        torch.testing.assert_close(got.sae(x).x_hat, x_hat, atol=1e-5, rtol=1e-5)


def test_record_sae_file_makes_a_run_the_analyses_read(tmp_path, capsys):
    """A sparsify SAE on EfficientNet-Lite0's block 0 (16 channels) recorded over shapes, then compared."""
    theirs = _sparsify_made(tmp_path / "sp")
    root = str(tmp_path / "runs")
    common = ["--model", "EfficientNetLite", "--layers", "0", "--image_size", "32", "--max_samples", "40",
              "--root", root, "--device", "cpu"]
    record.main(["--sae_file", str(tmp_path / "sp"), "--runname", "imported", *common])
    run = Run.open(root, "imported")
    assert run.layers == [0] and run.meta.sae_file == f"sparsify:{(tmp_path / 'sp').resolve()}"
    x = torch.from_numpy(np.asarray(run.acts(0), dtype=np.float32))
    with torch.no_grad():
        enc = theirs.encode(x)
        torch.testing.assert_close(run.dense_codes(0, "topk"),
                                   torch.zeros(len(x), F).scatter_(1, enc.top_indices, enc.top_acts), atol=1e-5,
                                   rtol=1e-5)
    record.main(["--sae_file", str(tmp_path / "sp"), "--runname", "again", *common])
    capsys.readouterr()
    wmppc.main(["--root", root, "--source", "imported", "--target", "again", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("All Layers : 1.0000")  # the same SAE over the same samples


def test_bad_sae_files_are_one_line(tmp_path, error_line):
    base = ["--model", "EfficientNetLite", "--layers", "0", "--image_size", "32", "--max_samples", "4",
            "--root", str(tmp_path / "runs"), "--device", "cpu", "--runname", "x"]
    (tmp_path / "empty").mkdir()
    assert "matches no format" in error_line(record.main, ["--sae_file", str(tmp_path / "empty"), *base])
    torch.save({"W_enc": torch.zeros(2, 2)}, tmp_path / "ae.pt")  # a pickle is never unpickled
    assert "matches no format" in error_line(record.main, ["--sae_file", str(tmp_path / "ae.pt"), *base])
    _sparsify_made(tmp_path / "sp")
    assert "not a saelens SAE folder" in error_line(record.main, ["--sae_file", str(tmp_path / "sp"), "--sae_format",
                                                                  "saelens", *base])
    narrow = sparsify.SparseCoder(7, sparsify.SparseCoderConfig(k=2, num_latents=14))
    narrow.save_to_disk(tmp_path / "narrow")
    msg = error_line(record.main, ["--sae_file", str(tmp_path / "narrow"), *base])
    assert "reads width 7, layer 0 of EfficientNetLite" in msg and "width 16" in msg
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    del cfg["k"]
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps(cfg))
    assert "missing k" in error_line(record.main, ["--sae_file", str(tmp_path / "sp"), *base])
    assert "--sae_file needs --model" in error_line(record.main, ["--sae_file", str(tmp_path / "sp"), "--runname", "y"])
    assert not (tmp_path / "runs" / "x").exists()
    with pytest.raises(UserError, match="unknown --sae_format"):
        formats.read(tmp_path / "sp", "hdf5")


def test_dictionary_learning_both_ways(run, tmp_path):
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    export.main(["--run", "r", "--root", str(run.path.parent), "--format", "dictionary_learning", "--out",
                 str(tmp_path / "dl")])
    theirs = AutoEncoderTopK.from_pretrained(str(tmp_path / "dl" / "layer02" / "ae.pt"))
    x = _x(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), _dense(run.sae(2), x), atol=1e-5, rtol=1e-5)
        made = AutoEncoderTopK(D, F, K)
        made.encoder.bias.copy_(torch.randn(F, generator=torch.Generator().manual_seed(6)) * 0.3)
        made.b_dec.copy_(torch.randn(D, generator=torch.Generator().manual_seed(7)))
        (tmp_path / "made").mkdir()
        torch.save(made.state_dict(), tmp_path / "made" / "ae.pt")
        (tmp_path / "made" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
        got = formats.read(tmp_path / "made").sae
        torch.testing.assert_close(_dense(got, x), made.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got(x).x_hat, made(x), atol=1e-5, rtol=1e-5)


def test_saev_both_ways(run, tmp_path):
    """saev's SAE is ReLU: an exported SAE gives this run's relu codes there; a saev SAE imports with all its
    features (top_k = F), so codes and reconstruction are saev's."""
    import saev.config
    import saev.nn

    export.main(["--run", "r", "--root", str(run.path.parent), "--format", "saev", "--out", str(tmp_path / "sv")])
    theirs = saev.nn.load(str(tmp_path / "sv" / "layer00" / "sae.pt"))
    x = _x(seed=8)
    with torch.no_grad():
        _, f_x, _ = theirs(x)
        torch.testing.assert_close(f_x, run.sae(0).pre_acts(x), atol=1e-5, rtol=1e-5)
        made = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=D, exp_factor=F // D))
        made.b_enc.copy_(torch.randn(F, generator=torch.Generator().manual_seed(9)) * 0.3)
        saev.nn.dump(str(tmp_path / "made" / "sae.pt"), made)
        got = formats.read(tmp_path / "made").sae
        x_hat, f_x, _ = made(x)
        assert got.top_k == F
        torch.testing.assert_close(_dense(got, x), f_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got(x).x_hat, x_hat, atol=1e-4, rtol=1e-5)


def test_an_unsafe_pickle_is_refused_not_run(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "evil").mkdir()
    torch.save({"encoder.weight": Boom()}, tmp_path / "evil" / "ae.pt")
    (tmp_path / "evil" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot read .* as a state dict of tensors"):
        formats.read(tmp_path / "evil")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_saelens_relu_and_jumprelu_keep_every_feature(tmp_path, architecture):
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    cls, cfg = (StandardSAE, StandardSAEConfig) if architecture == "standard" else (JumpReLUSAE, JumpReLUSAEConfig)
    theirs = cls(cfg(d_in=D, d_sae=F))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            gen = torch.Generator().manual_seed(p.numel())
            p.copy_(torch.rand(p.shape, generator=gen) * 0.5 if name == "threshold"
                    else torch.randn(p.shape, generator=gen))
    theirs.save_model(tmp_path / "s")
    got = formats.read(tmp_path / "s").sae
    x = _x(seed=10)
    with torch.no_grad():
        codes = theirs.encode(x)
        assert got.top_k == F and (codes == 0).any() and (codes > 0).any()
        torch.testing.assert_close(_dense(got, x), codes, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.pre_acts(x), codes, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got(x).x_hat, theirs.decode(codes), atol=1e-4, rtol=1e-5)


def test_input_normalisation_folds_exactly(tmp_path, capsys):
    """An SAE trained on (x - mean) * scale, applied to raw x: the codes of the normalised input, and the
    reconstruction mapped back to raw units."""
    theirs = _sparsify_made(tmp_path / "sp")
    mean, scale = torch.randn(D, generator=torch.Generator().manual_seed(11)), 0.37
    np.save(tmp_path / "mean.npy", mean.numpy())
    got = formats.read(tmp_path / "sp", norm=formats.InputNorm(mean, scale)).sae
    x = _x(seed=12)
    with torch.no_grad():
        enc = theirs.encode((x - mean) * scale)
        codes = torch.zeros(len(x), F).scatter_(1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(_dense(got, x), codes, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got(x).x_hat, theirs.decode(enc.top_acts, enc.top_indices) / scale + mean,
                                   atol=1e-5, rtol=1e-5)
    root = str(tmp_path / "runs")
    record.main(["--sae_file", str(tmp_path / "sp"), "--sae_input_mean", str(tmp_path / "mean.npy"),
                 "--sae_input_scale", str(scale), "--runname", "n", "--model", "EfficientNetLite", "--layers", "0",
                 "--image_size", "32", "--max_samples", "8", "--root", root, "--device", "cpu"])
    torch.testing.assert_close(Run.open(root, "n").sae(0).W_enc, got.W_enc)


def test_saelens_normalised_inputs_need_the_factor(tmp_path):
    _saelens_made(tmp_path / "lens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="give it with --sae_input_scale"):
        formats.read(tmp_path / "lens")
    assert formats.read(tmp_path / "lens", norm=formats.InputNorm(None, 2.0)).sae.top_k == K
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="rescales every input by its own norm"):
        formats.read(tmp_path / "lens", norm=formats.InputNorm(None, 2.0))


def test_an_imported_jumprelu_is_not_exported_as_topk(tmp_path, error_line):
    state = {**random_sae_state(D, F), "b_enc": torch.zeros(F), "threshold": torch.full((F,), 0.1)}
    make_run(tmp_path / "runs", "j", {0: _x(20).numpy()}, {0: state}, top_k=F)
    msg = error_line(export.main, ["--run", "j", "--root", str(tmp_path / "runs"), "--format", "saelens", "--out",
                                   str(tmp_path / "o")])
    assert "a JumpReLU SAE (imported) cannot be written" in msg and not (tmp_path / "o").exists()
