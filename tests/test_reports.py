"""The reports' building blocks: typed sections rendered to Markdown and HTML, and verdicts that say what
their table says."""
from __future__ import annotations

import numpy as np

from saeshare.render.demo_report import _random_verdict
from saeshare.render.sections import Bullets, Heading, Images, Link, Table, Text, markdown, page, write_report


def test_random_feature_verdict_follows_the_table_layer_by_layer():
    layers = [0, 5, 10, 15]
    sae = np.array([0.694, 0.978, 0.919, 0.941])  # the demo's EfficientNet probes, in distribution
    rnd = np.array([0.688, 0.976, 0.952, 0.960])
    assert _random_verdict(layers, sae, rnd) == "match or beat the SAE at layers 5, 10, 15 and fall below it at 0"
    assert _random_verdict(layers, sae, sae + 0.01) == "match or beat the SAE at every layer"
    assert _random_verdict(layers, sae, sae - 0.01) == "fall below the SAE at every layer"


def test_sections_render_once_to_markdown_and_to_escaped_html(tmp_path):
    sections = [Heading("Runs"), Text("a <b> & c", emphasis=True), Table(["run", "x"], [["<i>", "0.5"]]),
                Bullets(["ok: fine", "FAILED: bad"], "Checks:", [False, True]), Images([("f.png", "fig")]),
                Link("g/index.html", "open")]
    md = markdown("T", sections)
    assert md.startswith("# T\n") and "## Runs" in md and "**a <b> & c**" in md
    assert "| run | x |\n|---|---|\n| <i> | 0.5 |" in md and "Checks:\n- ok: fine\n- FAILED: bad" in md
    assert "![fig](f.png)" in md and "Previews: [g/index.html](g/index.html)" in md
    html = page("T", sections)
    assert "<td>&lt;i&gt;</td>" in html and "a &lt;b&gt; &amp; c" in html and "<i>" not in html
    assert "<li><b>FAILED: bad</b></li>" in html and '<img src="f.png" alt="fig">' in html
    write_report(tmp_path, "T", sections)
    assert (tmp_path / "report.md").read_text() == md and (tmp_path / "report.html").read_text() == html
