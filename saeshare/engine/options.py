"""The correlation engine's options, apart from the engine: commands that only read runs' features
(probe, ontology, show) take `AnalysisOptions` without importing the engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from errors import check_positive
from saeshare.disk.runs import Codes, StreamOptions

DEFAULT_MEM_GB = 1.0
Precision = Literal["fp32", "tf32", "bf16"]
"""The dense path's products: fp32, or on tensor cores (tf32, bf16) with every best match re-checked exactly."""
Null = Literal["none", "permute"]


@dataclass
class AnalysisOptions(StreamOptions):
    """What every analysis of SAE features (wmppc, comp_sharedness, show) takes."""
    codes: Codes | None = None
    """relu: dense ReLU pre-activations (the paper's code); topk: the SAE's top-k codes. Default relu
    (show.py --from_json: the JSON's codes)."""


@dataclass
class EngineOptions(AnalysisOptions):
    """The correlation engine's settings."""
    mem_gb: float = DEFAULT_MEM_GB
    """Memory for the correlation accumulators, GiB."""
    no_cache: bool = False
    """Neither read nor write <root>/.cache/."""
    null: Null = "none"
    """permute: compute the same scores against the target runs with their samples permuted (fixed seed, no
    retraining), what chance alone gives: a floor. (ontology.py's --null names its own baseline; a null
    *run*, trained on shuffled captions, is train_text.py --shuffle_captions.)"""
    precision: Precision = "fp32"
    """Dense path's products: fp32, or on tensor cores (tf32, bf16) with every feature's best match then
    re-checked exactly, so rho and the match equal fp32's (to 1e-5)."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("mem_gb", self.mem_gb)
