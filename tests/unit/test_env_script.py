"""``scripts/env.sh``: which interpreter a megatron-core release gets, and the one-line failure."""

import os
import subprocess

from tests import REPO_ROOT


def _fake_python(directory, name: str, version: str) -> str:
    """An executable called ``name`` that reports Python ``version`` (all env.sh asks of it)."""
    path = directory / name
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return str(path)


def _source(version: str, path: str, python: str = ""):
    """Source env.sh for ``version`` with only ``path`` on PATH (so no pyenv) and a throwaway HOME."""
    script = f'cd "{REPO_ROOT}" && source scripts/env.sh {version}'
    env = {"PATH": path, "HOME": "/nonexistent", "PYTHON": python}
    return subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_a_release_that_needs_python_3_12_fails_in_one_line_without_it(tmp_path):
    _fake_python(tmp_path, "python3.12", "3.11")  # a python3.12 on PATH that is not 3.12
    run = _source("0.19.2-missing", str(tmp_path))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: megatron-core 0.19.2-missing needs Python 3.12, which was not found")
    assert "PYTHON=/path/to/python3.12" in lines[0]
    assert not os.path.exists(os.path.join(REPO_ROOT, ".venv", "mcore-0.19.2-missing"))


def test_python_variable_of_the_wrong_version_is_passed_over(tmp_path):
    wrong = _fake_python(tmp_path, "python-old", "3.11")
    run = _source("0.17.0-missing", str(tmp_path), python=wrong)
    assert run.returncode == 1 and "needs Python 3.12" in run.stderr


def test_releases_up_to_0_16_ask_for_python_3_11(tmp_path):
    run = _source("0.16.9-missing", str(tmp_path))
    assert run.returncode == 1 and "needs Python 3.11" in run.stderr
