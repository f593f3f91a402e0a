"""Top-k sparse autoencoder (Gao et al.) with the defaults of the paper's code (docs/design.md#the-sae)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from errors import check_at_least, check_choices, check_positive


@dataclass
class SaeConfig:
    top_k: int = 32
    """Number of features kept per token."""
    expansion_factor: int = 8
    """Number of features F = expansion_factor * d_model."""
    lr: float = 5e-5
    """Adam learning rate, constant after the optional warm-up."""
    lr_warmup_steps: int = 0
    """Linear lr warm-up over this many steps (0 = off, as in the paper's code)."""
    normalize_decoder: bool = False
    """Renormalise decoder rows to unit norm after every step (off in the paper's code)."""
    auxk_alpha: float = 0.0
    """Weight of the AuxK loss that revives dead features (0 = off, as in the paper's code)."""
    sae_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the training step's dense encoder product (bfloat16: for GPUs with tensor cores); weights,
    optimizer state, decoder and gradients stay float32."""
    dead_tokens: int = 10_000_000
    """A feature is dead once it has not fired for this many tokens (AuxK and the dead fraction);
    capped at half the tokens seen so that a short run still measures something."""

    def __post_init__(self):
        check_choices(self)
        for name in ("top_k", "expansion_factor", "lr", "dead_tokens"):
            check_positive(name, getattr(self, name))
        check_at_least("lr_warmup_steps", self.lr_warmup_steps, 0)
        check_at_least("auxk_alpha", self.auxk_alpha, 0)


class EncoderOutput(NamedTuple):
    """The top-k codes of N samples."""
    top_acts: Tensor
    """[N, k] activations of the kept features (zeros where ReLU cut a kept feature)."""
    top_indices: Tensor
    """[N, k] feature ids of the kept features."""

    def dense(self, n_features: int) -> Tensor:
        """The same codes as a dense [N, F] tensor (zeros elsewhere)."""
        out = self.top_acts.new_zeros(self.top_acts.shape[0], n_features)
        return out.scatter_(1, self.top_indices, self.top_acts)


class Fvu:
    """Fraction of variance unexplained, sum |x - x_hat|^2 / sum |x - mean x|^2, accumulated over
    batches in float64 (no cancellation whatever the scale of x)."""

    def __init__(self):
        self.sq_err: Tensor | float = 0.0
        self.sum_sq: Tensor | float = 0.0
        self.sum_D: Tensor | float = 0.0
        self.n = 0

    @torch.no_grad()
    def update(self, x_ND: Tensor, x_hat_ND: Tensor) -> tuple[Tensor, Tensor]:
        """Sums stay on the device: no synchronisation until value() is read. Returns the batch's own
        squared error and variance (sum over rows of |x - batch mean|^2)."""
        x = x_ND.double()
        sq_err, sum_D, sum_sq = (x - x_hat_ND.double()).pow(2).sum(), x.sum(0), x.pow(2).sum()
        self.sq_err, self.sum_D, self.sum_sq = self.sq_err + sq_err, self.sum_D + sum_D, self.sum_sq + sum_sq
        self.n += x.shape[0]
        return sq_err, sum_sq - sum_D.pow(2).sum() / x.shape[0]

    def value(self) -> float:
        """NaN before any data or when x is constant (no variance to explain)."""
        total = float(self.sum_sq) - float(torch.as_tensor(self.sum_D).pow(2).sum()) / max(self.n, 1)
        return float(self.sq_err) / total if total > 0 else float("nan")


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    top_acts: Tensor
    top_indices: Tensor
    mse: Tensor
    auxk_loss: Tensor


warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class _Pattern(NamedTuple):
    """Where the k kept codes of N samples sit, as CSR index arrays of [N, F] and of its transpose."""
    idx_NK: Tensor
    """Feature ids, in topk's order (CSR of [N, F]: row n holds positions n*K .. n*K + K - 1)."""
    order: Tensor
    """[N*K] positions of the codes sorted by feature (the transpose's storage order)."""
    crow_t: Tensor
    """[F + 1] row pointers of the transpose."""

    @classmethod
    def of(cls, idx_NK: Tensor, n_features: int) -> "_Pattern":
        flat = idx_NK.reshape(-1)
        crow_t = torch.zeros(n_features + 1, dtype=torch.long, device=flat.device)
        crow_t[1:] = torch.bincount(flat, minlength=n_features).cumsum(0)
        return cls(idx_NK, torch.argsort(flat), crow_t)

    @classmethod
    def stacked(cls, idx_SNK: Tensor, n_features: int) -> "_Pattern":
        """The block-diagonal pattern of S SAEs' codes (SAE s's feature f is feature s*F + f), built from each
        SAE's own pattern, so that every product over it sums in that SAE's own order."""
        S, N, K = idx_SNK.shape
        parts = [cls.of(idx_NK, n_features) for idx_NK in idx_SNK]
        return cls(torch.cat([p.idx_NK + s * n_features for s, p in enumerate(parts)]),
                   torch.cat([p.order + s * N * K for s, p in enumerate(parts)]),
                   torch.cat([parts[0].crow_t[:1], *(p.crow_t[1:] + s * N * K for s, p in enumerate(parts))]))

    def csr(self, val_NK: Tensor, n_features: int) -> Tensor:
        """[N, F] with val at (n, idx[n, k])."""
        n, k = self.idx_NK.shape
        crow = torch.arange(0, n * k + 1, k, device=val_NK.device)
        return torch.sparse_csr_tensor(crow, self.idx_NK.reshape(-1), val_NK.reshape(-1), (n, n_features),
                                       check_invariants=False)

    def csr_t(self, val_NK: Tensor, n_features: int) -> Tensor:
        """The transpose [F, N] of csr(val), built directly."""
        n, k = self.idx_NK.shape
        return torch.sparse_csr_tensor(self.crow_t, self.order // k, val_NK.reshape(-1)[self.order], (n_features, n),
                                       check_invariants=False)


class _SparseDecode(torch.autograd.Function):
    """sum_k vals[n, k] W_dec[idx[n, k]] through sparse products (forward and backward N*K*D)."""

    @staticmethod
    def forward(ctx, vals_NK, W_dec, *pattern):
        ctx.save_for_backward(vals_NK, W_dec, *pattern)
        return torch.sparse.mm(_Pattern(*pattern).csr(vals_NK, W_dec.shape[0]), W_dec)

    @staticmethod
    def backward(ctx, g_ND):
        vals, W_dec, *saved = ctx.saved_tensors
        pattern, n_features = _Pattern(*saved), W_dec.shape[0]
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:  # <g[n], W_dec[idx[n, k]]>: the product g @ W_dec^T sampled at the codes
            g_vals = torch.sparse.sampled_addmm(pattern.csr(torch.zeros_like(vals), n_features), g_ND, W_dec.T,
                                                beta=0).values().view_as(vals)
        if ctx.needs_input_grad[1]:
            g_W = torch.sparse.mm(pattern.csr_t(vals, n_features), g_ND)
        return (g_vals, g_W, *(None,) * len(saved))


class _TopKEncode(torch.autograd.Function):
    """(vals, pattern) = TopK(ReLU((x - b_dec) @ W_enc)) for S SAEs of one shape at once (S = 1 for one), on
    inputs [S, N, D]: one batched product, then the codes of all S indexed as one block-diagonal [S*N, S*F]
    problem (SAE s's feature f is feature s*F + f), whose sparse products the decoder and the backward run
    once for all S. The gradient of a top-k code is zero outside the k kept features, so the backward
    touches only those: cost N*K*D, not the N*D*F of two dense products. Every product sums in each SAE's
    own order, so an SAE stepped in a stack is that SAE stepped alone, bit for bit on a CPU."""

    @staticmethod
    def forward(ctx, x_SND, b_SD, W_SDF, k, dtype):
        """`dtype`: of the dense encoder product (bfloat16 halves its cost on tensor cores); the kept codes,
        the decoder and every gradient stay float32."""
        xc_SND = x_SND - b_SD[:, None]
        pre_SNF = torch.bmm(xc_SND, W_SDF) if dtype == W_SDF.dtype else torch.bmm(xc_SND.to(dtype), W_SDF.to(dtype))
        vals, idx = pre_SNF.relu_().topk(k, dim=-1, sorted=False)
        S, N, _ = xc_SND.shape
        pattern = _Pattern.stacked(idx, W_SDF.shape[2])
        vals = vals.to(W_SDF.dtype).reshape(S * N, k)
        ctx.save_for_backward(xc_SND, W_SDF, vals, *pattern)
        ctx.mark_non_differentiable(*pattern)
        return vals, *pattern

    @staticmethod
    def backward(ctx, g_vals, *_):
        xc_SND, W_SDF, vals, *saved = ctx.saved_tensors
        (S, N, D), n_features = xc_SND.shape, W_SDF.shape[2]
        pattern = _Pattern(*saved)
        g_NK = g_vals * (vals > 0)  # through the ReLU
        g_x = g_b = g_W = None
        if ctx.needs_input_grad[0]:
            W_FD = W_SDF.transpose(1, 2).reshape(S * n_features, D)
            g_x = torch.sparse.mm(pattern.csr(g_NK, S * n_features), W_FD).view(S, N, D)
        if ctx.needs_input_grad[1]:  # b_dec enters as x - b_dec: minus the sum over samples of g_x
            col = torch.zeros(S * n_features, dtype=g_NK.dtype, device=g_NK.device)
            col.index_add_(0, pattern.idx_NK.reshape(-1), g_NK.reshape(-1))
            # one product per SAE: a batched one would sum in another order than the SAE alone
            g_b = -torch.stack([W_enc_DF @ col_F for W_enc_DF, col_F in zip(W_SDF, col.view(S, n_features))])
        if ctx.needs_input_grad[2]:
            g_FD = torch.sparse.mm(pattern.csr_t(g_NK, S * n_features), xc_SND.reshape(S * N, D))
            g_W = g_FD.view(S, n_features, D).transpose(1, 2)
        return g_x, g_b, g_W, None, None


class TopKSAE(nn.Module):
    """z = TopK(ReLU((x - b_dec) @ W_enc + b_enc)), x_hat = z @ W_dec + b_dec. SAEs trained here have no
    encoder bias (b_enc None, as the paper's); SAEs imported from other libraries may, and a JumpReLU SAE
    has a per-feature `threshold` (codes at or below it are 0; its top_k is F)."""

    def __init__(self, d_model: int, n_features: int, top_k: int, generator: torch.Generator | None = None):
        super().__init__()
        if not 0 < top_k <= n_features:
            raise ValueError(f"top_k must be in [1, {n_features}], got {top_k}")
        self.d_model, self.n_features, self.top_k = d_model, n_features, top_k
        W_enc = torch.empty(d_model, n_features)
        if generator is None:
            nn.init.kaiming_uniform_(W_enc)
        else:  # same bound as kaiming_uniform_, drawn from a seeded generator
            bound = math.sqrt(6.0 / n_features)
            W_enc.uniform_(-bound, bound, generator=generator)
        self.W_enc = nn.Parameter(W_enc)
        self.W_dec = nn.Parameter((W_enc.T / W_enc.T.norm(dim=1, keepdim=True)).contiguous())  # rows are read
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.b_enc: nn.Parameter | None = None
        self.threshold: nn.Parameter | None = None
        self.product_dtype: torch.dtype | None = None
        """dtype of the training step's dense encoder product; None: the weights' own."""

    def pre_acts(self, x_ND: Tensor, cols: slice | Tensor = slice(None), out: Tensor | None = None) -> Tensor:
        """Dense ReLU pre-activations [N, f] of features `cols` (the paper's `relu` codes), written into `out`
        when given (a reused buffer)."""
        x = x_ND - self.b_dec
        if self.b_enc is None:
            pre = torch.mm(x, self.W_enc[:, cols], out=out).relu_()
        else:
            pre = torch.addmm(self.b_enc[cols], x, self.W_enc[:, cols], out=out).relu_()
        return pre if self.threshold is None else pre.mul_(pre > self.threshold[cols])

    def encode(self, x_ND: Tensor) -> EncoderOutput:
        return EncoderOutput(*self.pre_acts(x_ND).topk(self.top_k, dim=-1, sorted=False))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        return F.embedding_bag(top_indices, self.W_dec, per_sample_weights=top_acts, mode="sum") + self.b_dec

    def forward(self, x_ND: Tensor, dead_mask_F: Tensor | None = None) -> ForwardOutput:
        """The training step's forward. Without AuxK it runs the fused top-k path (same values and
        gradients as `forward_reference`, tested); AuxK needs the dense pre-activations."""
        imported = self.b_enc is not None or self.threshold is not None  # the fused path knows neither
        if (dead_mask_F is not None and bool(dead_mask_F.any())) or imported:
            return self.forward_reference(x_ND, dead_mask_F)
        top_acts, *pattern = _TopKEncode.apply(x_ND[None], self.b_dec[None], self.W_enc[None], self.top_k,
                                               self.product_dtype or self.W_enc.dtype)
        x_hat = _SparseDecode.apply(top_acts, self.W_dec, *pattern) + self.b_dec
        top_indices = pattern[0]
        return ForwardOutput(x_hat, top_acts, top_indices, (x_ND - x_hat).pow(2).mean(), x_ND.new_zeros(()))

    def forward_reference(self, x_ND: Tensor, dead_mask_F: Tensor | None = None) -> ForwardOutput:
        """The paper's formulation: dense pre-activations, autograd through everything."""
        pre_NF = self.pre_acts(x_ND)
        top_acts, top_indices = pre_NF.topk(self.top_k, dim=-1, sorted=False)
        x_hat = self.decode(top_acts, top_indices)
        err = x_ND - x_hat
        mse = err.pow(2).mean()
        auxk_loss = x_ND.new_zeros(())
        if dead_mask_F is not None and bool(dead_mask_F.any()):
            # AuxK (Gao et al. §A.2): dead features reconstruct what the live ones missed.
            k_aux = min(x_ND.shape[-1] // 2, int(dead_mask_F.sum()))
            aux_acts, aux_idx = pre_NF.masked_fill(~dead_mask_F, 0).topk(k_aux, dim=-1, sorted=False)
            err_hat = F.embedding_bag(aux_idx, self.W_dec, per_sample_weights=aux_acts, mode="sum")
            auxk_loss = (err_hat - err.detach()).pow(2).sum() / err.detach().pow(2).sum().clamp_min(1e-12)
        return ForwardOutput(x_hat, top_acts, top_indices, mse, auxk_loss)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def state(self) -> dict[str, Tensor]:
        """The tensors of `layer{LL}.sae.safetensors` (docs/design.md#runs-on-disk); `b_enc` only when there is one."""
        names = ("W_enc", "W_dec", "b_dec") + tuple(n for n in ("b_enc", "threshold") if getattr(self, n) is not None)
        return {name: getattr(self, name).detach().cpu().contiguous() for name in names}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], top_k: int) -> "TopKSAE":
        d, n = state["W_enc"].shape
        if (state["W_dec"].shape != (n, d) or state["b_dec"].shape != (d,)
                or any(k in state and state[k].shape != (n,) for k in ("b_enc", "threshold"))):
            raise ValueError("inconsistent SAE shapes: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in state.items()))
        sae = cls(d, n, top_k)
        for name in ("b_enc", "threshold"):
            if name in state:
                setattr(sae, name, nn.Parameter(torch.zeros(n)))
        sae.load_state_dict(state)
        return sae


class SaeMetrics(NamedTuple):
    fvu: float
    l0: float
    dead_fraction: float
    tokens_seen: int
    steps: int
    fvu_fall: float | None
    """How much the batches' FVU still fell over the last fifth of the steps, relative to the fifth before
    (0.2: by a fifth); None under 10 steps. Well above 0 means the SAE had not converged."""


def _warm_up(opt: torch.optim.Optimizer, cfg: SaeConfig, step: int) -> None:
    """The learning rate of step `step` (0-based) under --lr_warmup_steps: linear up to cfg.lr."""
    if cfg.lr_warmup_steps:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)


class SaeTrainer:
    """Trains one SAE online, one batch of tokens at a time, and keeps its quality metrics."""

    def __init__(self, d_model: int, cfg: SaeConfig, device: torch.device | str = "cpu", seed: int = 0):
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        self.sae = TopKSAE(d_model, cfg.expansion_factor * d_model, cfg.top_k, generator=gen).to(device)
        self.sae.product_dtype = getattr(torch, cfg.sae_dtype)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr)
        self.step = 0
        self.tokens_seen = 0
        n = self.sae.n_features
        self.last_fired_F = torch.zeros(n, dtype=torch.long, device=device)  # token count when last fired
        self.fvu = Fvu()
        """Over all data seen while training."""
        self.l0_sum: Tensor | float = 0.0
        self._curve_S2 = torch.zeros(1024, 2, dtype=torch.float64, device=device)
        """Per step: the batch's squared error and variance (on the device: read only by metrics())."""

    def _dead_mask(self, window: int) -> Tensor:
        return self.tokens_seen - self.last_fired_F >= window

    def train_step(self, x_ND: Tensor) -> Tensor:
        """One Adam step on a batch of tokens; returns the batch MSE (a tensor: reading it is a device sync)."""
        cfg = self.cfg
        x_ND = x_ND.float()
        _warm_up(self.opt, cfg, self.step)
        dead = self._dead_mask(cfg.dead_tokens) if cfg.auxk_alpha > 0 else None
        out = self.sae(x_ND, dead)
        loss = out.mse + cfg.auxk_alpha * out.auxk_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if cfg.normalize_decoder:
            self.sae.normalize_decoder_()
        self.record(x_ND, out.x_hat, out.top_acts, out.top_indices)
        return out.mse.detach()

    @torch.no_grad()
    def record(self, x_ND: Tensor, x_hat_ND: Tensor, top_acts_NK: Tensor, top_indices_NK: Tensor) -> None:
        """The metrics' share of a step that has been taken (by this trainer or by a SeedStack)."""
        self.tokens_seen += x_ND.shape[0]
        fired = top_acts_NK > 0
        self.last_fired_F[top_indices_NK[fired]] = self.tokens_seen
        self.l0_sum = self.l0_sum + fired.sum()
        self._log_step(*self.fvu.update(x_ND, x_hat_ND))
        self.step += 1

    def _log_step(self, sq_err: Tensor, var: Tensor) -> None:
        if self.step == len(self._curve_S2):
            self._curve_S2 = torch.cat([self._curve_S2, torch.zeros_like(self._curve_S2)])
        self._curve_S2[self.step, 0], self._curve_S2[self.step, 1] = sq_err, var

    def fvu_fall(self) -> float | None:
        """See SaeMetrics.fvu_fall."""
        if self.step < 10:
            return None
        fifth = self.step // 5
        curve = self._curve_S2[self.step - 2 * fifth:self.step]
        prev_fvu, last_fvu = (float(c[:, 0].sum() / c[:, 1].sum()) for c in (curve[:fifth], curve[fifth:]))
        return 1 - last_fvu / prev_fvu if prev_fvu > 0 else None

    def metrics(self) -> SaeMetrics:
        window = max(1, min(self.cfg.dead_tokens, self.tokens_seen // 2))
        return SaeMetrics(
            fvu=self.fvu.value(),
            l0=float(self.l0_sum) / max(self.tokens_seen, 1),
            dead_fraction=float(self._dead_mask(window).float().mean()),
            tokens_seen=self.tokens_seen,
            steps=self.step,
            fvu_fall=self.fvu_fall(),
        )


class SeedStack:
    """The SAE steps of a layer's seeds (trainers of one shape) in one batched step (_TopKEncode): each
    SAE's parameters become views of stacked ones, so the trainers' SAEs always hold the current weights, and
    one Adam updates the stack. Adam is elementwise and the stacked products sum in each SAE's own order, so
    on the CPU this is each trainer's own step bit for bit (a GPU's batched product may round otherwise). AuxK
    needs the dense codes of each SAE: its trainers step one by one."""

    NAMES = ("W_enc", "W_dec", "b_dec")

    def __init__(self, trainers: list[SaeTrainer]):
        self.trainers, cfg = trainers, trainers[0].cfg
        self.stacked = len(trainers) > 1 and cfg.auxk_alpha == 0
        if not self.stacked:
            return
        self.params = {n: nn.Parameter(torch.stack([getattr(t.sae, n).detach() for t in trainers]))
                       for n in self.NAMES}
        for i, t in enumerate(trainers):
            for n in self.NAMES:
                setattr(t.sae, n, nn.Parameter(self.params[n].data[i], requires_grad=False))
            t.opt = None  # the stack's Adam steps them
        self.opt = torch.optim.Adam(self.params.values(), lr=cfg.lr)
        self.cfg, self.dtype = cfg, trainers[0].sae.product_dtype

    def train_step(self, x_ND: Tensor) -> None:
        if not self.stacked:
            for t in self.trainers:
                t.train_step(x_ND)
            return
        cfg, (S, k) = self.cfg, (len(self.trainers), self.trainers[0].sae.top_k)
        x_ND = x_ND.float()
        _warm_up(self.opt, cfg, self.trainers[0].step)
        W_enc, W_dec, b_dec = (self.params[n] for n in self.NAMES)
        (N, D), n_features = x_ND.shape, W_enc.shape[2]
        vals, *pattern = _TopKEncode.apply(x_ND.expand(S, N, D), b_dec, W_enc, k, self.dtype)
        x_hat_SND = _SparseDecode.apply(vals, W_dec.view(S * n_features, D), *pattern).view(S, N, D) + b_dec[:, None]
        loss = sum((x_ND - x_hat_SND[i]).pow(2).mean() for i in range(S))  # each SAE's own loss, as it alone
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            if cfg.normalize_decoder:  # each SAE's own view: the norms reduce as for it alone
                for t in self.trainers:
                    t.sae.normalize_decoder_()
            offset = torch.arange(S, device=x_ND.device)[:, None, None] * n_features
            idx_SNK = pattern[0].view(S, N, k) - offset
            for i, t in enumerate(self.trainers):
                t.record(x_ND, x_hat_SND[i], vals.view(S, N, k)[i], idx_SNK[i])
