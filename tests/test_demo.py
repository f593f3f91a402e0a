"""demo.py end to end at a small size: the report's numbers agree with the runs on disk."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import demo
from saeshare.disk.results import IMAGE, NULL, TEXT
from saeshare.disk.runs import Run


def _codes64(run: Run, layer: int) -> np.ndarray:
    sae = run.sae(layer)
    x = np.asarray(run.acts(layer), dtype=np.float64)
    return np.maximum((x - sae.b_dec.double().numpy()) @ sae.W_enc.double().numpy(), 0)


def _rho_mass(a_NF: np.ndarray, b_NG: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force float64 reference: signed max Pearson of every feature of A over B; constant -> 0."""
    ac, bc = a_NF - a_NF.mean(0), b_NG - b_NG.mean(0)
    na, nb = np.sqrt((ac ** 2).sum(0)), np.sqrt((bc ** 2).sum(0))
    corr = np.divide(ac.T @ bc, np.outer(na, nb), out=np.zeros((a_NF.shape[1], b_NG.shape[1])),
                     where=np.outer(na, nb) > 0)
    return corr.max(1), a_NF.sum(0)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo.main(["--out", str(out), "--max_samples", "120", "--layers", "0", "-1", "--image_size", "64", "--top", "4"])
    return out


def test_demo_writes_the_report(demo_run, capsys):
    for f in ("report.html", "report.md", "results.json", "comp_sharedness.json", "wmppc_runs.png",
              f"wmppc_{IMAGE}_{TEXT}.png", f"wmppc_{IMAGE}_{NULL}.png"):
        assert (demo_run / f).is_file(), f
    res = json.loads((demo_run / "results.json").read_text())
    assert (demo_run / res["gallery"]).is_file()
    for grid in res["grids"]:
        assert (demo_run / grid).is_file()
    html = (demo_run / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # opens offline
    for run in (IMAGE, TEXT, NULL):
        assert Run.open(demo_run / "sae_features", run).meta.complete


def test_report_numbers_match_runs_on_disk(demo_run):
    res = json.loads((demo_run / "results.json").read_text())
    root = demo_run / "sae_features"
    runs = {n: Run.open(root, n) for n in (IMAGE, TEXT, NULL)}
    for target in (TEXT, NULL):
        a, b = runs[IMAGE], runs[target]
        rho, mass = _rho_mass(_codes64(a, -1), _codes64(b, -1))
        expected_last = (mass * rho).sum() / mass.sum()
        got = res["wmppc"][f"{IMAGE}->{target}"]
        assert got["last_layer"] == pytest.approx(expected_last, abs=1e-5)
        # all layers: each feature's best over B's layers, averaged over A's layers weighted by feature count
        per_layer, weights = [], []
        for la in a.layers:
            ca = _codes64(a, la)
            rho_all = np.max([_rho_mass(ca, _codes64(b, lb))[0] for lb in b.layers], axis=0)
            m = ca.sum(0)
            per_layer.append((m * rho_all).sum() / m.sum())
            weights.append(ca.shape[1])
        assert got["all_layers"] == pytest.approx(np.average(per_layer, weights=weights), abs=1e-5)
        md = (demo_run / "report.md").read_text()
        assert f"{got['all_layers']:.3f} / {got['last_layer']:.3f}" in md
    # Comparative Sharedness: Delta = S * (rho_text^2 - rho_null^2), sorted
    rho_t, mass = _rho_mass(_codes64(runs[IMAGE], -1), _codes64(runs[TEXT], -1))
    rho_n, _ = _rho_mass(_codes64(runs[IMAGE], -1), _codes64(runs[NULL], -1))
    delta = mass * (rho_t ** 2 - rho_n ** 2)
    feats = res["sharedness"]["features"]
    assert [f["feature"] for f in feats] == list(np.argsort(-delta, kind="stable")[:4])
    for f in feats:
        assert f["delta"] == pytest.approx(delta[f["feature"]], rel=1e-4, abs=1e-6)


def test_second_demo_reuses_runs(demo_run, capsys):
    demo.main(["--out", str(demo_run), "--max_samples", "120", "--layers", "0", "-1", "--image_size", "64",
               "--top", "4"])
    out = capsys.readouterr().out
    assert out.count("reusing") == 5 and "report:" in out  # 3 runs and the 2 OOD runs
    # nor are the held-out and OOD sets recorded again (record.py: "wrote R (L layers of S")
    assert "layers of" not in out


def test_other_settings_need_overwrite(demo_run, error_line):
    assert "--overwrite" in error_line(demo.main, ["--out", str(demo_run), "--max_samples", "60", "--layers", "0", "-1",
                                                   "--image_size", "64"])


def test_report_is_calibrated(demo_run):
    res = json.loads((demo_run / "results.json").read_text())
    root = demo_run / "sae_features"
    for name in (IMAGE, TEXT, NULL):
        run = Run.open(root, name)
        assert run.meta.sae.seeds == [0, 1] and (run.path / "layer00.seed1.sae.safetensors").is_file()
    for pair, w in res["wmppc"].items():
        assert w["ci"]["all_layers"][0] <= w["corrected"]["all_layers"] <= w["ci"]["all_layers"][1], pair
        assert {"floor", "ceiling"} <= set(w) and set(res["similarity"][pair]["measures"]) == {
            "cka", "cka_debiased", "svcca", "mknn"}
    # the ceiling is the run against its own second seed, computed here again
    from synthetic import engine
    from wmppc import wmppc

    img = Run.open(root, IMAGE)
    again = wmppc(img, img.with_seed(1), engine("relu", no_cache=True))
    assert res["wmppc"][f"{IMAGE}->{TEXT}"]["ceiling"]["all_layers"] == pytest.approx(again.all_layers, abs=1e-6)
    md = (demo_run / "report.md").read_text()
    assert "## Calibrated comparison" in md and "Checks:" in md and "fvu_pooled > 1" in md
    assert (demo_run / "calibration.png").stat().st_size > 10_000


def test_sae_probes_section(demo_run):
    """Held-out and OOD sets never reach SAE training; the report shows what results.json holds."""
    import data
    from saeshare.disk.results import DemoResults

    res = DemoResults.load(demo_run / "results.json")
    root = demo_run / "sae_features"
    ids = lambda name: set(data.from_description(Run.open(root, name).meta.dataset).sample_ids)  # noqa: E731
    for name in (IMAGE, TEXT):
        assert Run.open(root, f"{name}_test").meta.sae_from == name and not ids(name) & ids(f"{name}_test")
        fit = data.from_description(Run.open(root, f"{name}_ood").meta.dataset)
        assert not any(s["shape"] == "star" or s["colour"] == "purple"
                       for n in range(len(fit)) for s in fit.attributes(n)["shapes"])
        stars = data.from_description(Run.open(root, f"{name}_ood_stars").meta.dataset)
        assert all(any(s["shape"] == "star" for s in stars.attributes(n)["shapes"]) for n in range(len(stars)))
        assert [o.ood for o in res.probes.ood[name]] == [f"{name}_ood_stars", f"{name}_ood_purple"]
        onto = res.probes.ontology[name]
        assert onto.coverage["null"].max() == 0 and onto.layers[-1] == Run.open(root, name).layers[-1]
    md = (demo_run / "report.md").read_text()
    acc = np.nanmean(res.probes.probes[IMAGE].balanced_accuracy["sae"][-1])
    assert "## SAE probes" in md and f"| {IMAGE} | {res.probes.probes[IMAGE].layers[-1]} | {acc:.3f} |" in md
    assert (demo_run / "probes.png").stat().st_size > 10_000


def test_demo_study_gives_the_demos_numbers(demo_run, capsys):
    """studies/demo.toml is what demo.py runs: at the test's size it reuses the demo's runs (nothing is
    trained) and its wMPPC equal the demo's."""
    import study
    from saeshare.disk.results import DemoResults, StudyResults

    text = (Path(demo.__file__).parent / "studies" / "demo.toml").read_text()
    for line in ('max_samples = 2000', 'image_size = 128', 'seeds = [0, 1]', 'lr = 1e-3', 'shuffle_captions = 0'):
        assert line in text
    small = (text.replace('out = "studies/demo_out"', f'out = "{demo_run}"')
             .replace("max_samples = 2000", "max_samples = 120").replace("image_size = 128", "image_size = 64")
             .replace("[[encoders]]\n", "[[encoders]]\nlayers = [0, -1]\n").replace("top = 8", "top = 4"))
    path = demo_run / "small.toml"
    path.write_text(small)
    ids = {n: Run.open(demo_run / "sae_features", n).meta.run_id for n in (IMAGE, TEXT, NULL)}
    study.main([str(path)])
    assert capsys.readouterr().out.count("reusing") == 3
    assert ids == {n: Run.open(demo_run / "sae_features", n).meta.run_id for n in ids}  # nothing trained again
    got = StudyResults.load(demo_run / "results.json")
    assert set(got.wmppc) == {f"{a}->{b}" for a in (IMAGE, TEXT, NULL) for b in (IMAGE, TEXT, NULL) if a != b}
    assert (demo_run / "report.html").is_file() and (demo_run / f"pairs/wmppc_{IMAGE}_{TEXT}.png").is_file()
    demo.main(["--out", str(demo_run), "--max_samples", "120", "--layers", "0", "-1", "--image_size", "64",
               "--top", "4"])
    want = DemoResults.load(demo_run / "results.json")
    for pair, w in want.wmppc.items():
        assert got.wmppc[pair].all_layers == w.all_layers and got.wmppc[pair].floor == w.floor
        assert got.wmppc[pair].ci.all_layers == w.ci.all_layers and got.wmppc[pair].ceiling == w.ceiling
        np.testing.assert_array_equal(got.wmppc[pair].layer_matrix, w.layer_matrix)
    assert [f.feature for f in got.sharedness[0].features] == [f.feature for f in want.sharedness.features]


def test_report_has_the_labels_checks(demo_run):
    res = json.loads((demo_run / "results.json").read_text())["labels"]
    assert set(res["agreement"]) == {TEXT, NULL} and 0 < res["n_top"] <= 64
    assert 0 <= res["ground_truth"] <= 1 and 0 <= res["ground_truth_floor"] <= 1
    assert "Labels (labels.py): the top shared features" in (demo_run / "report.md").read_text()
    gallery = (demo_run / json.loads((demo_run / "results.json").read_text())["gallery"]).read_text()
    assert gallery.count("<b>label</b>") >= 3  # the image feature and its matches, named on their cards


def test_report_has_the_joint_section(demo_run):
    res = json.loads((demo_run / "results.json").read_text())["joint"]
    assert set(res) == {f"{m} {IMAGE}->{b}" for m in ("sparc", "crosscoder") for b in (TEXT, NULL)}
    for rep in res.values():
        assert rep["runs"][0] == IMAGE and rep["floor"]["jaccard"][0][1] >= 0 and rep["n_measured"] == 24
    assert "## Joint dictionaries (value, floor in brackets)" in (demo_run / "report.md").read_text()
