#!/usr/bin/env bash
# The README's second command: install the test extras (and the offline data some tests read), run the suite.
# Extra arguments go to pytest (e.g. -m slow for the slow tier).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install_data.sh
bash launch/install_text_encoder.sh
pip install -q -e '.[test]'
exec python -m pytest -q tests "$@"
