#!/usr/bin/env bash
# The GPU rows of the speed benchmark, at the paper's own setting (batch 32, 4000 iterations, default stops),
# and the CUDA tests, in one call on a lent GPU (the image's python3 with its own torch; smi from src/).
# Usage: [MODELS='deit_tiny_patch16_224 ...'] bash benchmarks/gpu_speed.sh [BUDGET_SECONDS]   (results/inversion_speed_gpu.{json,md}; $OUT if set)
set -u
budget=${1:-560}
start=$(date +%s)
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"
timeout 150 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -25
# fp32 dense/sparse (and the final phase) of every model first, bf16 after, so a short lease still fills the
# table's main columns; runs already cached in results/inversion_speed_gpu_cells.json are not run again.
models=${MODELS:-deit_base_patch16_224 deit_tiny_patch16_224 deit_small_patch16_224}
for modes in "dense sparse" "dense sparse dense-bf16 sparse-bf16"; do
    left=$(( budget - ($(date +%s) - start) - 10 ))
    [ "$left" -gt 30 ] || break
    echo "speed benchmark ($modes): $left s left"
    python3 benchmarks/inversion_speed.py --device cuda --batch-size 32 --iterations 4000 --repeats 1 \
        --models $models --modes $modes --final-phase-iterations 100 --no-flops \
        --deadline "$left" --name inversion_speed_gpu
done
if [ -n "${OUT:-}" ]; then cp results/inversion_speed_gpu* "$OUT"/ 2>/dev/null; fi
echo "done in $(( $(date +%s) - start )) s"
