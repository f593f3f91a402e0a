"""One dictionary for several models: an encoder and a decoder per model (a "stream"), and one top-k over the
streams' summed pre-activations, so that latent j means the same thing in every stream.

- `sparc` (Nasiri-Sarvi et al. 2025): each stream keeps its own values at the shared top-k indices, and a
  cross-reconstruction loss decodes every stream's code into every other stream.
- `crosscoder` (Lindsey et al. 2024, with top-k as in Minder et al. 2025): one code, the ReLU of the summed
  pre-activations at the top-k, decoded into every stream; a latent is shared or model-specific by how its
  decoder norm splits between the streams.

Inputs are standardised per stream (centred, scaled to unit total variance), so the mean squared error summed
over a stream's dimensions is its FVU and no model dominates by scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from errors import UserError, check_choices, check_positive
from sae import _Pattern, _SparseDecode
from saeshare.core.progress import progress


@dataclass
class JointConfig:
    method: Literal["sparc", "crosscoder"] = "sparc"
    """sparc: a stream's own values at shared indices, plus cross-reconstruction; crosscoder: one shared code."""
    expansion_factor: int = 8
    """Latents = expansion_factor * the widest stream's d (the project's SAE default)."""
    top_k: int = 32
    """Latents kept per sample."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 256
    max_epochs: int = 50
    """At most this many epochs over the samples."""
    min_gain: float = 0.01
    """Stop when an epoch's mean loss is less than this fraction below the best so far."""
    cross_weight: float = 1.0
    """sparc: weight of the cross-reconstruction loss (1, as SPARC)."""
    holdout: float = 0.2
    """Share of the samples (a seeded random choice) left out of training; every measure is computed on them,
    so that a dictionary that memorises pairings of training samples does not score (0: measure on the
    training samples)."""
    seed: int = 0

    def __post_init__(self):
        check_choices(self)
        for name in ("expansion_factor", "top_k", "lr", "batch_size", "max_epochs"):
            check_positive(name, getattr(self, name))
        if not 0 <= self.min_gain < 1:
            raise UserError(f"--min_gain must be in [0, 1), got {self.min_gain}")
        if self.cross_weight < 0:
            raise UserError(f"--cross_weight must be >= 0, got {self.cross_weight}")
        if not 0 <= self.holdout < 1:
            raise UserError(f"--holdout must be in [0, 1), got {self.holdout}")

    def split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, measured rows), sorted; the same rows for the runs and their floor."""
        n_out = int(round(self.holdout * n))
        if self.holdout and not 2 <= n_out <= n - 2:
            raise UserError(f"--holdout {self.holdout} of {n} samples leaves {n_out} to measure on and {n - n_out} "
                            "to train on: both need at least 2")
        if not n_out:
            return np.arange(n), np.arange(n)
        order = np.random.default_rng([self.seed, n]).permutation(n)
        return np.sort(order[n_out:]), np.sort(order[:n_out])


class Standardised(NamedTuple):
    """A stream's samples, centred and scaled to unit total variance (sum over d of the variances) by the
    statistics of the training rows."""
    x_ND: Tensor
    mean_D: Tensor
    scale: float


def standardise(x_ND: np.ndarray | Tensor, fit_rows: np.ndarray | None = None, chunk: int = 16384) -> Standardised:
    """Statistics in float64 over chunks of the fit rows, the result in float32: memory is the output's."""
    x = np.asarray(x_ND)
    fit = np.arange(len(x)) if fit_rows is None else np.asarray(fit_rows)
    chunks = [torch.as_tensor(x[fit[i:i + chunk]], dtype=torch.float64) for i in range(0, len(fit), chunk)]
    mean_D = sum(c.sum(0) for c in chunks) / len(fit)
    total = float(sum((c - mean_D).pow(2).sum() for c in chunks)) / len(fit)
    if not total > 0:
        raise UserError("a stream is constant over the samples: nothing to reconstruct")
    scale = math.sqrt(total)
    out = torch.empty(x.shape, dtype=torch.float32)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = (torch.as_tensor(x[i:i + chunk], dtype=torch.float64) - mean_D) / scale
    return Standardised(out, mean_D.float(), scale)


class Codes(NamedTuple):
    """The top-k codes of a batch: shared indices, and values per stream (one row for crosscoders)."""
    idx_NK: Tensor
    vals_SNK: Tensor
    """[S, N, K] (crosscoder: [1, N, K], the one code every stream decodes)."""


class _KeptValues(torch.autograd.Function):
    """Pre-activations [N, K] of one stream at the kept latents, read from its dense product (made without
    autograd, for the selection); the backward touches only the kept entries, through the sparse products of
    the project's SAE: N*K*D work, where autograd through the dense product would cost N*F*D."""

    @staticmethod
    def forward(ctx, x_ND, b_dec, W_enc_FD, b_enc, pre_NF, *pattern):
        ctx.save_for_backward(x_ND - b_dec, W_enc_FD, *pattern)
        return pre_NF.gather(1, pattern[0])

    @staticmethod
    def backward(ctx, g_NK):
        xc_ND, W_enc_FD, *saved = ctx.saved_tensors
        pattern, n_latents = _Pattern(*saved), W_enc_FD.shape[0]
        col_F = torch.zeros(n_latents, dtype=g_NK.dtype, device=g_NK.device)
        col_F.index_add_(0, pattern.idx_NK.reshape(-1), g_NK.reshape(-1))
        g_W = torch.sparse.mm(pattern.csr_t(g_NK, n_latents), xc_ND)
        return None, -(col_F @ W_enc_FD), g_W, col_F, None, *(None,) * len(saved)


class JointSAE(nn.Module):
    def __init__(self, d_S: list[int], n_latents: int, top_k: int, method: str, seed: int = 0):
        super().__init__()
        if not 0 < top_k <= n_latents:
            raise UserError(f"--top_k must be in [1, {n_latents}] (the latents), got {top_k}")
        self.d_S, self.n_latents, self.top_k, self.method = list(d_S), n_latents, top_k, method
        gen = torch.Generator().manual_seed(seed)
        bound = math.sqrt(6.0 / n_latents)  # kaiming_uniform_'s, from a seeded generator, as the project's SAE
        enc = [torch.empty(n_latents, d).uniform_(-bound, bound, generator=gen) for d in d_S]
        # [F, d] both, as the sparse products of the project's SAE decoder take them
        self.W_enc = nn.ParameterList([nn.Parameter(w) for w in enc])
        self.W_dec = nn.ParameterList([nn.Parameter(w / w.norm(dim=1, keepdim=True)) for w in enc])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(n_latents)) for _ in d_S])
        self.b_dec = nn.ParameterList([nn.Parameter(torch.zeros(d)) for d in d_S])

    @property
    def n_streams(self) -> int:
        return len(self.d_S)

    def logits(self, s: int, x_ND: Tensor) -> Tensor:
        """Dense pre-activations [N, F] of stream s alone."""
        return torch.addmm(self.b_enc[s], x_ND - self.b_dec[s], self.W_enc[s].T)

    def encode(self, xs: list[Tensor], streams: list[int] | None = None) -> Codes:
        """The joint code of the given streams (default all): top-k of their summed pre-activations."""
        return self._encode(xs, streams)[0]

    def _encode(self, xs: list[Tensor], streams: list[int] | None = None) -> tuple[Codes, tuple]:
        """The code and its sparsity pattern (shared by every stream's values and decoder)."""
        streams = list(range(self.n_streams)) if streams is None else streams
        with torch.no_grad():
            pre = {s: self.logits(s, xs[s]) for s in streams}
            idx_NK = sum(pre.values()).topk(self.top_k, dim=1, sorted=False).indices
        pattern = tuple(_Pattern.of(idx_NK, self.n_latents))
        vals = [_KeptValues.apply(xs[s], self.b_dec[s], self.W_enc[s], self.b_enc[s], pre[s], *pattern)
                for s in streams]
        if self.method == "crosscoder":
            return Codes(idx_NK, torch.stack(vals).sum(0, keepdim=True).relu()), pattern
        return Codes(idx_NK, torch.stack(vals).relu()), pattern

    def decode(self, t: int, idx_NK: Tensor, vals_NK: Tensor) -> Tensor:
        """sum_k vals[n, k] W_dec[t][idx[n, k]] + b_dec[t]."""
        return self._decode(t, vals_NK, tuple(_Pattern.of(idx_NK, self.n_latents)))

    def _decode(self, t: int, vals_NK: Tensor, pattern: tuple) -> Tensor:
        return _SparseDecode.apply(vals_NK, self.W_dec[t], *pattern) + self.b_dec[t]

    def loss(self, xs: list[Tensor], cross_weight: float) -> Tensor:
        """The training loss: the streams' squared errors per sample summed; sparc adds the
        mean cross-reconstruction error of every ordered pair of streams, times `cross_weight`. A stream's own
        and cross reconstructions go through one decoder product (one dense gradient of its decoder)."""
        codes, pattern = self._encode(xs)
        S, n = self.n_streams, len(xs[0])
        cross = self.method == "sparc" and cross_weight > 0 and S > 1
        stacked = tuple(_Pattern.of(codes.idx_NK.repeat(S, 1), self.n_latents)) if cross else pattern
        err_S, cross_err = [], []
        for t in range(S):
            own = codes.vals_SNK[min(t, len(codes.vals_SNK) - 1)]
            if not cross:
                err_S.append((xs[t] - self._decode(t, own, pattern)).pow(2).sum(1).mean())
                continue
            sources = [t] + [s for s in range(S) if s != t]  # own code first, then every other stream's
            err_sN = (xs[t].repeat(S, 1) - self._decode(t, codes.vals_SNK[sources].reshape(S * n, -1), stacked))
            err_sN = err_sN.pow(2).sum(1).view(S, n).mean(1)
            err_S.append(err_sN[0])
            cross_err.append(err_sN[1:])
        total = torch.stack(err_S).sum()
        return total + cross_weight * torch.cat(cross_err).mean() if cross else total

    def state(self) -> dict[str, Tensor]:
        out = {}
        for s in range(self.n_streams):
            for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
                out[f"stream{s}.{name}"] = getattr(self, name)[s].detach().cpu().contiguous()
        return out


class Trained(NamedTuple):
    model: JointSAE
    loss_E: list[float]
    """Mean training loss of each epoch (one entry an epoch run)."""


def train_joint(xs: list[Tensor], cfg: JointConfig, device: str | torch.device = "cpu", desc: str = "joint") -> Trained:
    """Adam over shuffled batches (seeded), epoch after epoch until the loss stops improving by cfg.min_gain."""
    d_S = [x.shape[1] for x in xs]
    model = JointSAE(d_S, cfg.expansion_factor * max(d_S), cfg.top_k, cfg.method, cfg.seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, losses = len(xs[0]), []
    bar = progress(range(cfg.max_epochs), desc=desc, unit="epoch")
    for _ in bar:
        total, order = torch.zeros((), device=device), torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            loss = model.loss([x[rows].to(device) for x in xs], cfg.cross_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(rows)  # on the device: one synchronisation an epoch
        losses.append(float(total) / n)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if len(losses) > 1 and losses[-1] > min(losses[:-1]) * (1 - cfg.min_gain):
            break
    return Trained(model.eval(), losses)
