#!/usr/bin/env bash
# The README's second command: install the test extras (and the offline data some tests read), run the suite.
# Extra arguments go to pytest (e.g. -m slow for the slow tier; -n 0 runs it in one process).
# Two pytest-xdist workers, each file whole on one of them (its module-scoped fixtures, e.g. a trained model, built
# once): the suite's subprocess trainings leave a core idle in one process (1.2-1.5 of 2 busy on average).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install_data.sh
bash launch/install_text_encoder.sh
pip install -q -e '.[test]'
exec python -m pytest -q tests -n 2 --dist loadfile "$@"
