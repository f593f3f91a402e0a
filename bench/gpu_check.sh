#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): every device figure beside the CPU's, one line each.
# On a machine without CUDA it says what it skips and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 SPARSIFY_DISABLE_TRITON=1
exec uv run --offline python bench/gpu_check.py "$@"
