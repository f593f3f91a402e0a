"""Reductions over a stream of chunks of samples that keep memory independent of N."""
from __future__ import annotations

import torch


def merge_top(top_val_KF: torch.Tensor, top_idx_KF: torch.Tensor, codes_nF: torch.Tensor,
              start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K largest values of each feature among a running top-K and a chunk of codes of samples
    start.., with their sample ids."""
    k = top_val_KF.shape[0]
    val_KF, pos_KF = torch.cat([top_val_KF, codes_nF]).topk(k, dim=0)
    return val_KF, torch.where(pos_KF < k, top_idx_KF.gather(0, pos_KF.clamp(max=k - 1)), pos_KF - k + start)
