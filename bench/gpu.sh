#!/usr/bin/env bash
# The README's GPU rows, in one command on a machine with one GPU and jax with CUDA (run from the repo root):
#   bash bench/gpu.sh [OUT_DIR]
# Wheels that machine lacks (ml_collections; diffusers for the peer rows) are installed from .device_wheels/
# when that folder is there. Logs go to OUT_DIR (default /tmp/gpu_bench); traces to /tmp.
set -u
out=${1:-${OUT:-/tmp/gpu_bench}}
mkdir -p "$out"
nvidia-smi -L
if ls .device_wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device_wheels/*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache PYTHONUNBUFFERED=1
cd bench
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
show() { grep -E "^\||^backend|^where|Error|error:" "$1" | grep -v "^| ynn" ; }
# 1. MFU of DDPM's CIFAR-10 step at batch 128 against the H100's 989 TFLOP/s bf16 dense peak, and where the time goes.
timeout 170 python3 train_step.py --configs cifar10_ddpm --batch 128 --steps 20 --set model.dtype=bfloat16 \
  --peak-tflops 989 --profile /tmp/trace_bf16 > "$out/mfu_bf16.log" 2>&1; show "$out/mfu_bf16.log"
timeout 110 python3 train_step.py --configs cifar10_ddpm --batch 128 --steps 20 --peak-tflops 989 \
  > "$out/mfu_fp32.log" 2>&1; show "$out/mfu_fp32.log"
# cuDNN's fused flash attention (model.attention_impl=cudnn; not yet run on a GPU), bf16, the same step.
timeout 110 python3 train_step.py --configs cifar10_ddpm --batch 128 --steps 20 --set model.dtype=bfloat16 \
  --set model.attention_impl=cudnn --peak-tflops 989 > "$out/mfu_bf16_cudnn.log" 2>&1; show "$out/mfu_bf16_cudnn.log"
# 2. This project vs diffusers' UNet2DModel on the same GPU (peer in eager PyTorch; bf16 = torch.autocast).
for dtype in bfloat16 float32; do
  timeout 160 python3 vs_peers.py --cases ddpm_cifar10,fmnist_small --batch 128 --no-rss --peer-device cuda \
    --steps 10 --rounds 2 --set model.dtype=$dtype > "$out/vs_peers_$dtype.log" 2>&1; show "$out/vs_peers_$dtype.log"
done
