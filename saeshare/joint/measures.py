"""What a joint dictionary says is shared, streamed over the samples in chunks (float64 sums):

- each live latent's share of each stream: its decoder row's norm times its mean code in that stream, over
  the largest stream's (crosscoders have one code, so this is the decoder-norm ratio of the literature);
  a latent is *shared* when every stream's share is >= 0.8 and *private* to a stream when every other
  stream's is < 0.2 (Minder et al.'s relative-norm cut-offs, 0.4-0.6 shared and >0.9 specific, written as
  ratios to the largest);
- Jaccard of the latents each stream picks *alone* (its own top-k, the others' inputs absent) per sample;
- cross R^2: each stream's code alone decoded into every stream, 1 - squared error / variance;
- FVU of every stream under the joint code.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from saeshare.joint.dictionary import JointSAE

SHARED_RATIO = 0.8
PRIVATE_RATIO = 0.2
CHUNK = 4096


class JointMeasures(NamedTuple):
    share_SF: np.ndarray
    """[S, F] each latent's weight in each stream over the largest (0 for dead latents)."""
    live_F: np.ndarray
    """[F] bool: fired on at least one sample under the joint code."""
    shared_F: np.ndarray
    """[F] bool: live and shared by every stream."""
    shared_fraction: float
    """The shared latents' part of the total weight (decoder norm times code mass, summed over streams): what
    the count says, without the pull of rare or split latents."""
    private_fraction: list[float]
    """Per stream, its private latents' part of the total weight."""
    shared_latents: float
    """Of the live latents, the share that is shared (a count)."""
    private_latents: list[float]
    """Per stream, the share of the live latents private to it."""
    jaccard_SS: np.ndarray
    """[S, S] mean over samples of |A_s & A_t| / |A_s | A_t| for the latents s and t pick alone."""
    cross_r2_SS: np.ndarray
    """[S, S] R^2 of stream t from stream s's code alone (row s, column t)."""
    fvu_S: np.ndarray
    """[S] FVU of every stream under the joint code."""


def alone(model: JointSAE, s: int, x_ND: Tensor) -> tuple[Tensor, Tensor]:
    """(indices, values) [N, K] stream s picks by itself: the top-k of the ReLU of its own pre-activations."""
    vals, idx = model.logits(s, x_ND).relu().topk(model.top_k, dim=1, sorted=False)
    return idx, vals


def _sets(idx_NK: Tensor, vals_NK: Tensor, n_latents: int) -> Tensor:
    """[N, F] bool: the latents with a positive code."""
    out = torch.zeros(len(idx_NK), n_latents, dtype=torch.bool, device=idx_NK.device)
    return out.scatter_(1, idx_NK, vals_NK > 0)


@torch.no_grad()
def measure(model: JointSAE, xs: list[Tensor], device: str | torch.device = "cpu") -> JointMeasures:
    S, F, n = model.n_streams, model.n_latents, len(xs[0])
    mass_SF = torch.zeros(S, F, dtype=torch.float64, device=device)
    err_S = torch.zeros(S, dtype=torch.float64, device=device)
    cross_SS = torch.zeros(S, S, dtype=torch.float64, device=device)
    jac_SS = torch.zeros(S, S, dtype=torch.float64, device=device)
    for start in range(0, n, CHUNK):
        x = [xi[start:start + CHUNK].to(device) for xi in xs]
        codes = model.encode(x)
        for s in range(S):
            vals = codes.vals_SNK[min(s, len(codes.vals_SNK) - 1)]
            mass_SF[s].index_add_(0, codes.idx_NK.reshape(-1), vals.reshape(-1).double())
            err_S[s] += (x[s] - model.decode(s, codes.idx_NK, vals)).double().pow(2).sum()
        picks = [alone(model, s, x[s]) for s in range(S)]
        sets = [_sets(i, v, F) for i, v in picks]
        for s in range(S):
            for t in range(S):
                cross_SS[s, t] += (x[t] - model.decode(t, *picks[s])).double().pow(2).sum()
                union = (sets[s] | sets[t]).sum(1)
                inter = (sets[s] & sets[t]).sum(1)
                jac_SS[s, t] += torch.where(union > 0, inter / union.clamp_min(1), 1.0).double().sum()
    norm_SF = torch.stack([w.detach().double().norm(dim=1) for w in model.W_dec])
    weight_SF = (norm_SF * mass_SF).cpu().numpy()
    live_F = (mass_SF.sum(0) > 0).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        share_SF = np.where(live_F, weight_SF / weight_SF.max(0), 0.0)
    shared = live_F & np.all(share_SF >= SHARED_RATIO, axis=0)
    private = [live_F & (share_SF[s] >= 1) & np.all(np.delete(share_SF, s, axis=0) < PRIVATE_RATIO, axis=0)
               for s in range(S)]
    n_live, total_F = max(int(live_F.sum()), 1), weight_SF.sum(0)
    weight = max(float(total_F.sum()), 1e-300)
    total_S = [float((x.double() - x.double().mean(0)).pow(2).sum()) for x in xs]
    return JointMeasures(share_SF, live_F, shared, float(total_F[shared].sum() / weight),
                         [float(total_F[p].sum() / weight) for p in private], float(shared.sum() / n_live),
                         [float(p.sum() / n_live) for p in private], (jac_SS / n).cpu().numpy(),
                         1 - cross_SS.cpu().numpy() / np.array(total_S)[None, :], err_S.cpu().numpy() / total_S)


class Matches(NamedTuple):
    """Each feature of a run's own SAE against the joint latents, by correlation over samples."""
    latent_F: np.ndarray
    """[F_A] int64: the joint latent best correlated with the feature."""
    rho_F: np.ndarray
    """[F_A] float64: that correlation (0 for a constant feature)."""


@torch.no_grad()
def match(codes_chunks, joint_chunks, n: int) -> Matches:
    """Pearson correlation of every feature with every latent from float64 sums over paired chunks of
    [rows, F_A] and [rows, F_J] codes; the best latent per feature. One [F_A, F_J] float64 matrix, updated
    in place."""
    sx = sxx = sy = syy = sxy = None
    for a, b in zip(codes_chunks, joint_chunks):
        a, b = a.double(), b.double()
        if sxy is None:
            sx, sxx, sy, syy = a.sum(0), a.square().sum(0), b.sum(0), b.square().sum(0)
            sxy = a.T @ b
            continue
        sx, sxx, sy, syy = sx + a.sum(0), sxx + a.square().sum(0), sy + b.sum(0), syy + b.square().sum(0)
        sxy.addmm_(a.T, b)
    cov = sxy.sub_(torch.outer(sx, sy).div_(n))  # in place: the matrix is the largest thing here
    sd_a, sd_b = (sxx - sx.square() / n).clamp_min(0).sqrt(), (syy - sy.square() / n).clamp_min(0).sqrt()
    cov.div_(torch.where(sd_a > 0, sd_a, torch.inf)[:, None]).div_(torch.where(sd_b > 0, sd_b, torch.inf)[None, :])
    rho, latent = cov.max(1)
    return Matches(latent.cpu().numpy(), rho.cpu().numpy())
