#!/usr/bin/env bash
# The GPU checks of the decoding fast path, in one go (issue 17), about 5-10 minutes on
# one H100/H200, most of it torch.compile at warm-up:
#   1. racm3 bench decoder on the `small` preset (125M, random weights, bf16): 512-token
#      prompts, 1024 new tokens, batch 1 and 8; the compiled step (a CUDA graph) beside
#      the plain path and HF GPT2LMHeadModel.generate. Targets: <= 1 ms per step at
#      batch 1, >= 20x HF generate.
#   2. text-to-image through the engine with a `small`-shaped decoder (random weights,
#      the demo bundle's tokenizer, VQ and CLIP): fast path against plain path, with a
#      same-images check.
# Needs torch with CUDA and the project installed with its bench extras
# (`pip install -e '.[bench]'`). Results go to $OUT (default reports/) as JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-reports}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"

"$PY" -m app.cli bench decoder --device cuda --preset small --prompt-len 512 \
    --new-tokens 1024 --batch 1 --batch 8 --repeats 3 --no-recompute \
    --json "$OUT/bench_decoder_cuda.json"

"$PY" -m benchmarks.gpu_t2i --device cuda --preset small --batch 1 --batch 8 \
    --candidates 1 --candidates 8 --repeats 3 --json "$OUT/bench_t2i_cuda.json"
