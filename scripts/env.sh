# Sourced by demo.sh / test.sh: create (once) and activate .venv/mcore-<VERSION> with this package.
#   source scripts/env.sh [MEGATRON_CORE_VERSION]      (default: $MCORE_VERSION, else 0.16.1)
#
# Python: megatron-core 0.17 and newer require Python >= 3.12; 0.13 - 0.16 run on 3.11 (the
# interpreter this machine kind has active). The interpreter is found the way a user's machine has
# it: $PYTHON when set, else pythonX.Y on PATH, else pyenv's newest installed X.Y.
# torch is pinned to 2.13.0: on Python 3.11 that is the CPU build on this machine's disk; on
# Python 3.12 the package index serves only the CUDA build (about 4.7 GB), which megatron_lora's
# CPU mode runs on a host without a GPU. Wheels are downloaded once into $MEGATRON_LORA_WHEELS
# (default ~/.cache/megatron_lora/wheels) and installed from there, so a second venv, or the next
# run on this machine, does not download them again.
MCORE_VERSION="${1:-${MCORE_VERSION:-0.16.1}}"
TORCH_VERSION="2.13.0"
case "${MCORE_VERSION}" in
  0.1[3-6].*) PY_VERSION="3.11" ;;
  *) PY_VERSION="3.12" ;;
esac

_find_python() {  # an interpreter of version $1 (X.Y), printed as a path; nothing if none
  local want="$1" candidate version root
  for candidate in ${PYTHON:-} "python${want}"; do
    if command -v "${candidate}" > /dev/null 2>&1; then
      version=$("${candidate}" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2> /dev/null) || continue
      if [ "${version}" = "${want}" ]; then command -v "${candidate}"; return 0; fi
    fi
  done
  if command -v pyenv > /dev/null 2>&1; then
    root=$(pyenv root)
    version=$(pyenv versions --bare 2> /dev/null | grep -E "^${want//./\\.}\.[0-9]+$" | sort -V | tail -n 1)
    if [ -n "${version}" ] && [ -x "${root}/versions/${version}/bin/python${want}" ]; then
      echo "${root}/versions/${version}/bin/python${want}"; return 0
    fi
  fi
  return 1
}

VENV=".venv/mcore-${MCORE_VERSION}"
if [ ! -x "${VENV}/bin/python" ]; then
  if ! PY=$(_find_python "${PY_VERSION}"); then
    echo "error: megatron-core ${MCORE_VERSION} needs Python ${PY_VERSION}, which was not found (looked at" \
         "\$PYTHON, python${PY_VERSION} on PATH and pyenv); install it (e.g. pyenv install ${PY_VERSION})" \
         "or set PYTHON=/path/to/python${PY_VERSION}." >&2
    return 1 2> /dev/null || exit 1
  fi
  mkdir -p .venv && "${PY}" -m venv "${VENV}"
fi
# shellcheck disable=SC1091
source "${VENV}/bin/activate"
WHEELS="${MEGATRON_LORA_WHEELS:-${XDG_CACHE_HOME:-${HOME}/.cache}/megatron_lora/wheels}"
mkdir -p "${WHEELS}"
TORCH_TAG="cp${PY_VERSION/./}"
if ! ls "${WHEELS}"/torch-"${TORCH_VERSION}"*-"${TORCH_TAG}"-*.whl > /dev/null 2>&1; then
  python -m pip download --quiet --disable-pip-version-check --no-deps -d "${WHEELS}" "torch==${TORCH_VERSION}"
fi
TORCH_WHEEL=$(ls "${WHEELS}"/torch-"${TORCH_VERSION}"*-"${TORCH_TAG}"-*.whl | head -n 1)
python -m pip install --quiet --disable-pip-version-check \
  "${TORCH_WHEEL}" "megatron-core==${MCORE_VERSION}" -e ".[test,hf]"
unset -f _find_python
