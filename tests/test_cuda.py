"""The device paths against the CPU's, on CUDA (skipped without it; bench/gpu_check.sh runs them), and the
GPU check script itself, which must run on a CPU-only machine."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae import TopKSAE
from saeshare.joint.dictionary import JointSAE
from synthetic import engine

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.cuda
@cuda
def test_fused_sae_step_on_cuda_equals_the_cpu():
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for dev in ("cpu", "cuda"):
        sae = TopKSAE(64, 512, 8, generator=torch.Generator().manual_seed(0)).to(dev)
        sae(x.to(dev)).mse.backward()
        grads[dev] = {n: p.grad.cpu() for n, p in sae.named_parameters()}
    for n, g in grads["cpu"].items():
        torch.testing.assert_close(grads["cuda"][n], g, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@cuda
def test_sparse_and_dense_paths_on_cuda_equal_the_cpu(tmp_path):
    from synthetic import make_run, random_sae_state

    rng = np.random.default_rng(0)
    z = rng.normal(size=(600, 4))
    acts = [(z @ rng.normal(size=(4, 16)) + rng.normal(size=(600, 16))).astype(np.float32) for _ in "AB"]
    runs = [make_run(tmp_path, name, {0: a}, {0: random_sae_state(16, 64, seed)}, 4)
            for seed, (name, a) in enumerate(zip("AB", acts))]
    for codes in ("relu", "topk"):
        cpu = engine(codes, no_cache=True).pair_stats(*runs)[0, 0]
        gpu = engine(codes, no_cache=True, device="cuda").pair_stats(*runs)[0, 0]
        np.testing.assert_allclose(gpu.rho_F, cpu.rho_F, atol=1e-5)
        np.testing.assert_array_equal(gpu.match_F, cpu.match_F)


@pytest.mark.cuda
@cuda
def test_joint_loss_on_cuda_equals_the_cpu():
    model = JointSAE([32, 24], 64, 4, "sparc", seed=1)
    xs = [torch.randn(128, 32), torch.randn(128, 24)]
    cpu = model.loss(xs, 1.0)
    gpu = model.cuda().loss([x.cuda() for x in xs], 1.0)
    assert float(gpu.detach()) == pytest.approx(float(cpu.detach()), rel=1e-5)


def test_gpu_check_skips_without_cuda_and_checks_itself_on_the_cpu():
    script = str(ROOT / "bench" / "gpu_check.py")
    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and out.stdout.count("skip   ") == 7 and "no CUDA device" in out.stdout
    out = subprocess.run([sys.executable, script, "--device", "cpu", "--small", "--families", "Bert",
                          "EfficientNetLite", "Llava"], capture_output=True, text=True, cwd=ROOT,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    lines = [line for line in out.stdout.splitlines() if line.startswith(("ok", "FAILED"))]
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert len(lines) == 19 and all(line.startswith("ok") for line in lines)
    assert sum("3 SAE seeds in one batched step" in line for line in lines) == 2
    assert sum("Llava" in line and "bfloat16" in line for line in lines) == 2  # its image rows and caption rows
    assert "gpu_check: 0 failed" in out.stdout
    assert np.isfinite([float(line.split("from the CPU ")[1].split()[0]) for line in lines]).all()
