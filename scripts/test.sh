#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite on megatron-core 0.16.1, then again on the
# oldest supported release (megatron_lora.compat.MIN_VERSION). .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
for version in 0.16.1 0.13.0; do
  echo "=== megatron-core ${version} ==="
  source scripts/env.sh "${version}"
  python -m pytest -q tests "$@"
  deactivate
done
