"""The top-k SAE of docs/design.md#the-sae: forward maths against a float64 reference, init, training, metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae import SaeConfig, SaeTrainer, TopKSAE


def test_forward_matches_float64_reference():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 5)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(50, 16)
    out = sae(x)
    W_enc, W_dec, b = (t.detach().double().numpy() for t in (sae.W_enc, sae.W_dec, sae.b_dec))
    pre = np.maximum((x.double().numpy() - b) @ W_enc, 0)
    z = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :5]
    np.put_along_axis(z, top, np.take_along_axis(pre, top, 1), 1)
    np.testing.assert_allclose(out.x_hat.detach().numpy(), z @ W_dec + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(out.mse.detach()), np.mean((x.double().numpy() - (z @ W_dec + b)) ** 2), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 7, 32])
def test_exactly_k_nonzero_codes_per_token(k):
    torch.manual_seed(1)
    sae = TopKSAE(32, 256, k)
    x = torch.randn(200, 32)
    acts, idx = sae.encode(x)
    assert acts.shape == idx.shape == (200, k)
    dense = torch.zeros(200, 256).scatter_(1, idx, acts)
    assert ((dense != 0).sum(1) == k).all()  # random data: far more than k positive pre-activations
    assert all(len(set(r)) == k for r in idx.tolist())  # k distinct features
    # the kept codes are the k largest pre-activations
    pre = sae.pre_acts(x)
    assert torch.equal(acts.sort(1).values, pre.topk(k, 1).values.sort(1).values)


def test_init_follows_spec():
    sae = TopKSAE(48, 384, 8, generator=torch.Generator().manual_seed(3))
    bound = math.sqrt(6 / 384)  # kaiming_uniform_ on a [d, F] tensor: fan_in = F
    assert sae.W_enc.shape == (48, 384) and sae.W_dec.shape == (384, 48) and sae.b_dec.shape == (48,)
    assert sae.W_enc.abs().max() <= bound and sae.W_enc.abs().max() > 0.9 * bound
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(384))
    cos = torch.nn.functional.cosine_similarity(sae.W_dec, sae.W_enc.T, dim=1)
    torch.testing.assert_close(cos, torch.ones(384))
    assert torch.equal(sae.b_dec, torch.zeros(48))
    # default init (no generator) uses torch's own kaiming_uniform_
    assert TopKSAE(48, 384, 8).W_enc.abs().max() <= bound


def test_same_seed_same_sae():
    a = SaeTrainer(8, SaeConfig(top_k=2, expansion_factor=2), seed=5).sae
    b = SaeTrainer(8, SaeConfig(top_k=2, expansion_factor=2), seed=5).sae
    assert torch.equal(a.W_enc, b.W_enc)


def _sparse_data(n=4096, d=32, n_atoms=64, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    idx = torch.randint(0, n_atoms, (n, k), generator=g)
    coef = torch.rand(n, k, generator=g) * 2
    return torch.einsum("nk,nkd->nd", coef, atoms[idx])


@pytest.mark.parametrize("options", [{}, {"normalize_decoder": True, "lr_warmup_steps": 10, "auxk_alpha": 1 / 32}])
def test_fvu_goes_down_with_training(options):
    x = _sparse_data()
    trainer = SaeTrainer(32, SaeConfig(top_k=8, expansion_factor=4, lr=1e-3, **options), seed=0)

    def fvu():
        with torch.no_grad():
            return float((x - trainer.sae(x).x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    start = fvu()
    for _ in range(10):
        for batch in x.split(256):
            trainer.train_step(batch)
    end = fvu()
    assert end < 0.5 * start, (start, end)
    m = trainer.metrics()
    assert m.tokens_seen == 10 * len(x)
    assert 0 < m.fvu < 1 and m.l0 == pytest.approx(8, abs=0.5) and 0 <= m.dead_fraction <= 1
    if options.get("normalize_decoder"):
        torch.testing.assert_close(trainer.sae.W_dec.norm(dim=1), torch.ones(128))


def test_running_fvu_matches_definition():
    """FVU over the data seen = sum of squared errors at each step / total variance of all tokens."""
    x = _sparse_data(n=512)
    trainer = SaeTrainer(32, SaeConfig(top_k=4, expansion_factor=2, lr=1e-3), seed=0)
    sq_err = 0.0
    for batch in x.split(128):
        with torch.no_grad():
            sq_err += float((batch.double() - trainer.sae(batch).x_hat.double()).pow(2).sum())
        trainer.train_step(batch)
    x64 = x.double()
    assert trainer.metrics().fvu == pytest.approx(sq_err / float((x64 - x64.mean(0)).pow(2).sum()), rel=1e-6)


def test_dead_fraction_counts_features_that_stopped_firing():
    trainer = SaeTrainer(8, SaeConfig(top_k=1, expansion_factor=2, lr=1e-9), seed=0)
    x = torch.randn(1, 8).repeat(400, 1)  # one token repeated: only one feature ever fires
    trainer.train_step(x)
    trainer.train_step(x)
    assert trainer.metrics().dead_fraction == pytest.approx(15 / 16)


def test_from_state_round_trip_and_shape_check():
    sae = TopKSAE(8, 32, 4)
    again = TopKSAE.from_state(sae.state(), 4)
    for k, v in sae.state().items():
        assert torch.equal(again.state()[k], v)
    bad = sae.state()
    bad["b_dec"] = torch.zeros(9)
    with pytest.raises(ValueError, match="inconsistent SAE shapes"):
        TopKSAE.from_state(bad, 4)


def _grads(sae: TopKSAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def paper_mse(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """The paper's formulation: top-k scattered into a dense code, dense decoder product, autograd."""
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc)
    vals, idx = pre.topk(sae.top_k, dim=-1, sorted=False)
    return (torch.zeros_like(pre).scatter_(1, idx, vals) @ sae.W_dec + sae.b_dec - x).pow(2).mean()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(50, 16, 64, 4), (300, 24, 192, 16), (7, 8, 8, 8)])
def test_fused_step_equals_autograd_on_the_paper_formulation(dtype, tol, shape):
    n, d, n_features, k = shape
    sae = TopKSAE(d, n_features, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(2)) * 2
    out = sae(x)
    fused, paper = _grads(sae, out.mse), _grads(sae, paper_mse(sae, x))
    assert out.mse.item() == pytest.approx(paper_mse(sae, x).item(), rel=tol)
    for name in paper:
        assert float((fused[name] - paper[name]).abs().max()) <= tol * float(paper[name].abs().max()), name
    ref = sae.forward_reference(x)
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=tol, atol=tol)
    assert sorted(out.top_indices[0].tolist()) == sorted(ref.top_indices[0].tolist())


def test_auxk_takes_the_reference_path_with_the_same_loss():
    sae = TopKSAE(16, 64, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(40, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    out = sae(x, dead)
    assert out.auxk_loss > 0 and out.mse.item() == pytest.approx(sae(x).mse.item(), rel=1e-6)


def test_bfloat16_products_stay_close_to_float32():
    """--sae_dtype bfloat16: only the dense encoder product is bfloat16 (8-bit mantissa, ~4e-3 relative);
    the loss agrees to 2%, the gradients point the same way (cosine > 0.99), weights stay float32."""
    sae = TopKSAE(64, 512, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
    g32 = _grads(sae, sae(x).mse)
    sae.product_dtype = torch.bfloat16
    out = sae(x)
    g16 = _grads(sae, out.mse)
    assert out.mse.item() == pytest.approx(sae.forward_reference(x).mse.item(), rel=2e-2)
    for name in g32:
        cos = torch.nn.functional.cosine_similarity(g16[name].flatten(), g32[name].flatten(), dim=0)
        assert cos > 0.99 and g16[name].dtype == torch.float32, name
    trainer = SaeTrainer(16, SaeConfig(sae_dtype="bfloat16", top_k=4, expansion_factor=2))
    trainer.train_step(torch.randn(32, 16))
    assert trainer.sae.W_enc.dtype == torch.float32 and trainer.sae.product_dtype == torch.bfloat16


@pytest.mark.parametrize("options", [{}, {"normalize_decoder": True, "lr_warmup_steps": 5, "lr": 1e-3},
                                     {"sae_dtype": "bfloat16"}])
@pytest.mark.parametrize("shape", [(512, 16), (200, 48), (784, 320)])
def test_seeds_stepped_together_are_each_seed_alone(options, shape):
    """A SeedStack's batched step is, for every seed, the step its trainer takes alone: on the CPU the weights
    and metrics after 12 steps are the same bit for bit (784 x 320: where the pattern's unstable sort orders
    ties otherwise in a longer array, so the stack sorts each seed's own)."""
    from sae import SeedStack

    n, d = shape
    cfg = SaeConfig(**options)
    alone = [SaeTrainer(d, cfg, seed=s) for s in (0, 1, 5)]
    stack = SeedStack([SaeTrainer(d, cfg, seed=s) for s in (0, 1, 5)])
    assert stack.stacked
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        x = torch.randn(n, d, generator=g) * 3 + 1
        for t in alone:
            t.train_step(x)
        stack.train_step(x)
    for a, b in zip(alone, stack.trainers):
        assert all(torch.equal(b.sae.state()[name], w) for name, w in a.sae.state().items())
        assert a.metrics() == b.metrics()
    assert not SeedStack([SaeTrainer(8, SaeConfig(auxk_alpha=0.1), seed=s) for s in (0, 1)]).stacked
