"""Saves that leave no writer process behind when the rank that forked it dies (a fork hook)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


_saving = False
_fork_hook_installed = False


def _die_with_parent() -> None:
    """In a child forked during a save: receive SIGKILL when the rank (its parent) dies."""
    if not _saving or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the rank died between fork and prctl
        os._exit(1)


@contextlib.contextmanager
def save_without_orphans():
    """Run a dist-checkpoint save that leaves no process behind, however the rank ends.

    Megatron's writer forks writer processes for each save; a rank killed mid-save (SIGKILL, a
    preempted node) would leave them behind holding the tensors they write. Children forked while
    this is active die with the rank, the writer's results server among them: it is forked, not
    spawned (``compat.keep_checkpoint_writer_in_process``).
    """
    global _saving, _fork_hook_installed
    from megatron_lora.core import compat

    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_die_with_parent)
        _fork_hook_installed = True
    _saving = True
    try:
        compat.keep_checkpoint_writer_in_process()  # its server is forked here: it dies with the rank
        yield
    finally:
        _saving = False
