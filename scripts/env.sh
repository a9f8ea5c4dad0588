# Sourced by demo.sh / test.sh: create (once) and activate .venv/mcore-<VERSION> with this package.
#   source scripts/env.sh [MEGATRON_CORE_VERSION]      (default 0.16.1)
# torch is pinned to 2.13.0 on purpose: that is the CPU build on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build.
MCORE_VERSION="${1:-${MCORE_VERSION:-0.16.1}}"
VENV=".venv/mcore-${MCORE_VERSION}"
if [ ! -x "${VENV}/bin/python" ]; then
  mkdir -p .venv && python3 -m venv "${VENV}"
fi
# shellcheck disable=SC1091
source "${VENV}/bin/activate"
python -m pip install --quiet --disable-pip-version-check \
  "torch==2.13.0" "megatron-core==${MCORE_VERSION}" -e ".[test,hf]"
