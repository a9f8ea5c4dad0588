"""Root conftest: puts the repository root on sys.path, so that `tests.*` and `megatron_lora`
import the same way in the pytest process and in the ranks tests/distributed/launcher.py starts."""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
