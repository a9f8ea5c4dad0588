#!/usr/bin/env bash
# Install (into .venv, see scripts/env.sh) and run the tests on the supported range of
# megatron-core. .ci/run calls exactly this.
#   1. Python 3.12 + megatron-core 0.19.2 (newest release; torch's CUDA build in CPU mode): all tests.
#   2. Python 3.11 + megatron-core 0.16.1 (newest for Python 3.11; torch's CPU build): all tests.
#   3. megatron-core 0.13.0 (oldest supported, megatron_lora.core.compat.MIN_VERSION): the layer,
#      checkpoint, conversion and MoE tests and every single-process test; the launch-script tests
#      (marked once) and the training-script runs already ran twice above.
# Extra arguments go to every pytest run. Installs the Debian packages slurm-wlm and munge first
# when they are missing (root or sudo).
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
echo "=== Python 3.12, megatron-core 0.19.2 ==="
source scripts/env.sh 0.19.2
python -m pytest -q -rs tests "$@"
deactivate
echo "=== Python 3.11, megatron-core 0.16.1 ==="
source scripts/env.sh 0.16.1
python -m pytest -q -rs tests "$@"
deactivate
echo "=== Python 3.11, megatron-core 0.13.0: layers, checkpoints, conversion ==="
source scripts/env.sh 0.13.0
python -m pytest -q -rs -m "not once" tests/unit \
  tests/distributed/test_layers_match_unsharded.py tests/distributed/test_external_gemm.py \
  tests/distributed/test_te_double.py tests/distributed/test_init_tp_invariant.py \
  tests/distributed/test_factor_reduction_flags.py tests/distributed/test_apply_lora.py \
  tests/distributed/test_gpt_lora_matches_tp1.py tests/distributed/test_checkpoint.py \
  tests/distributed/test_convert.py tests/distributed/test_hybrid_model.py \
  tests/distributed/test_export.py tests/distributed/test_branch_input_recompute.py \
  tests/distributed/test_lora_plus.py \
  "$@"
deactivate
