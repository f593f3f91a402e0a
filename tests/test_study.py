"""study.py (docs/design.md#scale): bad configs are refused in one line before any training; a study interrupted in
the middle resumes without training its complete runs again; --dry_run trains nothing."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import study
from saeshare.disk.runs import Run
from tiny_models import checkpoint_for


def _config(out, ckpt, extra_encoder: str = "", groups: str = "") -> str:
    enc = "\n".join(f'''[[encoders]]
runname = "{name}"
modality = "text"
model = "Bert"
checkpoint = "{ckpt}"
layers = [1]
batch_size = 8
{extra}
''' for name, extra in (("a", ""), ("b", "shuffle_captions = 0"), ("c", extra_encoder)))
    return f'''out = "{out}"
seeds = [0, 1]
device = "cpu"
[data]
max_samples = 40
[sae]
expansion_factor = 2
top_k = 4
lr = 1e-3
{enc}
[analyses]
similarity = false
{groups}'''


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return checkpoint_for("Bert", tmp_path_factory.mktemp("ckpt"))


def test_interrupted_study_resumes_without_retraining(tmp_path, bert, monkeypatch, capsys, error_line):
    path = tmp_path / "s.toml"
    path.write_text(_config(tmp_path / "out", bert, groups='[[analyses.groups]]\nsource = "a"\nshared = ["c"]\n'
                                                          'not_shared = ["b"]\ntop = 2\n'))
    study.main([str(path), "--dry_run"])
    out = capsys.readouterr().out
    assert "train a" in out and "1 layers of d 64" in out and "all-layers wMPPC matrix" in out  # measured
    assert not (tmp_path / "out" / "sae_features").exists()
    study.main([str(path), "--train_index", "2"])  # a Slurm array task: encoder c alone, no analysis
    assert Run.open(tmp_path / "out" / "sae_features", "c") and not (tmp_path / "out" / "sae_features" / "a").exists()
    assert not (tmp_path / "out" / "report.md").exists()
    real_train, calls = study.train, []

    def train_then_stop(cfg, sae_cfg, modality):
        calls.append(cfg.runname)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while training the second run
        return real_train(cfg, sae_cfg, modality)

    monkeypatch.setattr(study, "train", train_then_stop)
    with pytest.raises(SystemExit):
        study.main([str(path)])
    first = Run.open(tmp_path / "out" / "sae_features", "a").meta.run_id
    monkeypatch.setattr(study, "train", lambda *a: calls.append(a[0].runname) or real_train(*a))
    study.main([str(path)])
    out = capsys.readouterr().out
    assert calls == ["a", "b", "b"] and "reusing" in out and "report:" in out  # c came from its array task
    assert Run.open(tmp_path / "out" / "sae_features", "a").meta.run_id == first
    assert (tmp_path / "out" / "report.md").read_text().count("a->c") >= 1
    assert "a: shared with c, not with b" in (tmp_path / "out" / "report.md").read_text()
    res = study.StudyResults.load(tmp_path / "out" / "results.json")
    assert len(res.grids[0]) == 2 and all((tmp_path / "out" / g).is_file() for g in res.grids[0])
    assert res.grids[0][0] in (tmp_path / "out" / "report.html").read_text()
    study.main([str(path), "--dry_run"])
    assert "PFLOP" in capsys.readouterr().out  # every run trained: the matrix's cost is known
    path.write_text(path.read_text().replace("lr = 1e-3", "lr = 2e-3"))  # other SAE settings
    assert "--overwrite" in error_line(study.main, [str(path)])


@pytest.mark.parametrize("change,needle", [
    (lambda s: s.replace('model = "Bert"', 'model = "Bart"', 1), "unknown --model 'Bart'"),
    (lambda s: s.replace('model = "Bert"\n', '', 1), "encoders[0]: missing field 'model'"),
    (lambda s: s.replace('runname = "b"', 'runname = "a"'), "two runs are named 'a'"),
    (lambda s: s + '[[analyses.groups]]\nsource = "a"\nshared = ["zz"]\nnot_shared = ["b"]\n',
     "analyses.groups[0] names 'zz', not a run of the study"),
    (lambda s: s.replace("top_k = 4", "topk = 4"), "sae: unknown field 'topk'"),
    (lambda s: s.replace('modality = "text"', 'modality = "audio"', 1), "`modality` must be"),
    (lambda s: s + "\n[oops", "not TOML"),
    (lambda s: s.replace("layers = [1]", 'layers = "all"', 1), "encoders[0]: layers: a list expected"),
])
def test_bad_config_is_one_line_before_any_training(tmp_path, bert, error_line, change, needle):
    path = tmp_path / "s.toml"
    path.write_text(change(_config(tmp_path / "out", bert)))
    assert needle in error_line(study.main, [str(path)])
    assert not (tmp_path / "out").exists()


def test_readme_paper_encoders_are_the_study_file(capsys):
    """The README's list of the paper's encoders is `study.py --commands` on the study file, verbatim, and
    every training example of the README uses a model and checkpoint of that file."""
    repo = Path(__file__).resolve().parents[1]
    study.main([str(repo / "studies" / "paper_coco.toml"), "--commands"])
    printed = capsys.readouterr().out
    readme = (repo / "README.md").read_text()
    marker = "<!-- study.py studies/paper_coco.toml --commands -->\n```bash\n"
    assert marker + printed + "```" in readme
    lines = printed.splitlines()
    assert sum(line.startswith("uv run train_") for line in lines) == 20
    known = {(a[a.index("--model") + 1], a[a.index("--model") + 3]) for a in map(shlex.split, lines)
             if "--model" in a}
    for example in re.findall(r"uv run train_(?:image|text)\.py [^`\n]*", readme):
        argv = shlex.split(example)
        if "--model" in argv and any(f.endswith("_model_name") for f in argv):
            flag = next(f for f in argv if f.endswith("_model_name"))
            pair = (argv[argv.index("--model") + 1], argv[argv.index(flag) + 1])
            if pair[0] not in {m for m, _ in known} or pair[1].startswith("/"):
                continue  # a family beyond the paper's (SDText), or an offline example's local folder
            assert pair in known or pair[1] == "all-MiniLM-L6-v2", example


def test_a_study_with_an_mllm(tmp_path, bert, capsys, error_line):
    """`modality = "mllm"` makes both runs of the pair, compared with the others; the report has the MLLM's
    modality shares beside each layer's image -> caption wMPPC; a rerun reuses the pair; other MLLM settings
    are refused without --overwrite."""
    from saeshare.disk.results import StudyResults

    llava = checkpoint_for("Llava", tmp_path / "llava")
    path = tmp_path / "s.toml"
    config = _config(tmp_path / "out", bert).replace('[[encoders]]\nrunname = "c"', f'''[[encoders]]
runname = "ll"
modality = "mllm"
model = "Llava"
checkpoint = "{llava}"
layers = [0, 2]
batch_size = 8
min_fires = 2

[[encoders]]
runname = "c"''')
    path.write_text(config)
    study.main([str(path), "--commands"])
    line = next(x for x in capsys.readouterr().out.splitlines() if "train_mllm.py" in x)
    assert "--runname ll" in line and "--min_fires 2" in line
    study.main([str(path), "--dry_run"])
    assert "train ll_image and ll_text: mllm Llava" in capsys.readouterr().out
    study.main([str(path)])
    res = StudyResults.load(tmp_path / "out" / "results.json")
    assert {"ll_image->ll_text", "ll_image->a", "a->ll_text"} <= set(res.wmppc)
    w, shares = res.wmppc["ll_image->ll_text"], res.runs["ll_image"].modality_shares
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## MLLM ll: image tokens and caption tokens" in report and (tmp_path / "out" / "modality_ll.png").is_file()
    for i, layer in enumerate((0, 2)):
        s = shares[layer]
        row = (f"| {layer} | {s.image_only:.3f} | {s.text_only:.3f} | {s.both:.3f} | {s.n_features} | "
               f"{s.image_mass:.3f} | {w.layer_matrix[i, i]:.3f} |")
        assert row in report
    capsys.readouterr()
    study.main([str(path)])
    assert re.search(r"reusing \S+/ll_image and \S+/ll_text \(same settings\)", capsys.readouterr().out)
    path.write_text(config.replace("min_fires = 2", "min_fires = 3"))
    assert "'ll_image' exists" in error_line(study.main, [str(path)])
    path.write_text(config.replace("min_fires = 2", 'token = "mean"'))
    assert "not token" in error_line(study.main, [str(path)])
