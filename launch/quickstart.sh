#!/usr/bin/env bash
# The README's first command: install everything, then train + sample on the embedded default data.
# Extra arguments go to diffusion_jax.main (e.g. --config.num_train_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install_data.sh
bash launch/install_text_encoder.sh
pip install -q -e .
exec python -m diffusion_jax.main --config="${CONFIG:-configs/latent.py}" \
  --workdir="${WORKDIR:-runs/latent}" "$@"
