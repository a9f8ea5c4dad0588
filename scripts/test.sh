#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite on megatron-core 0.16.1, then again on the
# oldest supported release (megatron_lora.core.compat.MIN_VERSION). .ci/run calls exactly this.
# Installs the Debian packages slurm-wlm and munge first when they are missing (root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/distributed/test_slurm.py starts a throwaway Slurm cluster on localhost: it needs the
# Debian packages (they fail, not skip, without them).
if ! command -v sinfo > /dev/null || [ ! -x /usr/sbin/munged ] || [ ! -x /usr/sbin/slurmd ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  ${SUDO} apt-get update -qq
  DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq slurm-wlm munge
fi
echo "=== megatron-core 0.16.1 ==="
source scripts/env.sh 0.16.1
python -m pytest -q -rs tests "$@"
deactivate
# The oldest release: everything except the version-independent launch-script tests (marked once).
echo "=== megatron-core 0.13.0 ==="
source scripts/env.sh 0.13.0
python -m pytest -q -rs -m "not once" tests "$@"
deactivate
