#!/usr/bin/env bash
# The test command: installs what is missing (tools/bootstrap.sh), then runs the CPU test suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k matcher`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
exec "${PYTHON:-python3}" -m pytest tests "$@"
