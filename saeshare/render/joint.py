"""The joint-dictionary section of the demo's and the study's reports (joint.py)."""
from __future__ import annotations

from saeshare.disk.results import JointReport
from saeshare.render.sections import Heading, Section, Table, Text

HEAD = ["method", "runs", "shared fraction", "Jaccard", "cross R2 A->B", "cross R2 B->A", "live latents"]
ABOUT = ("One dictionary trained on both runs' pooled activations of the last layers (joint.py), measured on "
         "held-out samples, each figure beside its floor: the same training with the second run's samples "
         "permuted. Shared fraction: the part of the dictionary's weight on latents that both runs use; Jaccard: "
         "of the latents each run picks alone; cross R2: a run's activations decoded from the other run's code.")


def _cell(value: float, floor: float) -> str:
    return f"{value:.3f} ({floor:.3f})"


def joint_sections(joints: dict[str, JointReport]) -> list[Section]:
    rows = [[rep.method, " / ".join(rep.runs), _cell(rep.shared_fraction, rep.floor.shared_fraction),
             _cell(rep.jaccard[0][1], rep.floor.jaccard[0][1]), _cell(rep.cross_r2[0][1], rep.floor.cross_r2[0][1]),
             _cell(rep.cross_r2[1][0], rep.floor.cross_r2[1][0]), f"{rep.live_latents} of {rep.n_latents}"]
            for rep in joints.values()]
    return [Heading("Joint dictionaries (value, floor in brackets)"), Text(ABOUT), Table(HEAD, rows)] if rows else []


def joint_findings(joints: dict[str, JointReport]) -> list[str]:
    """A line per joint dictionary, for the terminal."""
    return [f"joint {key}: shared fraction {rep.shared_fraction:.3f} (floor {rep.floor.shared_fraction:.3f}), "
            f"Jaccard {rep.jaccard[0][1]:.3f} ({rep.floor.jaccard[0][1]:.3f}), cross R2 {rep.cross_r2[0][1]:.3f} "
            f"({rep.floor.cross_r2[0][1]:.3f}) / {rep.cross_r2[1][0]:.3f} ({rep.floor.cross_r2[1][0]:.3f})"
            for key, rep in joints.items()]
