#!/usr/bin/env bash
# The GPU target of `python -m benchmarks.speed`: a Llama-2-7B-shaped llama with random weights (bf16, built from
# a LlamaConfig on the GPU, nothing downloaded), batch 8 x 512, on one H100/H200; about 3-4 minutes.
# Results: $OUT (the device tool's folder) or benchmarks/results: speed_gpu.json and speed.md.
# To merge into the committed results: copy speed_gpu.json to benchmarks/results/ and run
#   python -m benchmarks.speed --render
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
python3 -c "import torch, transformers, peft; assert torch.cuda.is_available(), 'no CUDA device'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 290 python3 -m benchmarks.speed --target gpu --compile --out "$out" "$@" 2>&1 | tee "$out/speed_gpu.log"
