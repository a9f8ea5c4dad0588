"""Atomic saves: iteration directories, the tracker file and the rename that commits a save.

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed into place, and only then does the
tracker file (``latest_*.txt``) move, so a crash mid-save leaves the previous checkpoint as the
latest (docs/design.md §7).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from megatron_lora.core.checkpoint.dist_ranks import barrier, rank
from megatron_lora.core.checkpoint.errors import CheckpointError


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str, tracker: str) -> Optional[int]:
    """The iteration named by ``root/tracker`` (the newest COMPLETE checkpoint), or None."""
    path = os.path.join(root, tracker)
    if not os.path.exists(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, expected an iteration number; delete it to "
                              "start over or write the iteration of a complete checkpoint into it.")
    return int(text)


def check_iteration_exists(root: str, iteration: int, tracker: str) -> None:
    """The iteration directory a load asks for exists; else say which complete ones there are."""
    ckpt_dir = iteration_dir(root, iteration)
    if os.path.isdir(ckpt_dir):
        return
    present = sorted(d for d in os.listdir(root) if d.startswith("iter_") and not d.endswith((".tmp", ".old"))) \
        if os.path.isdir(root) else []
    raise CheckpointError(
        f"{ckpt_dir} does not exist, though {os.path.join(root, tracker)} names iteration {iteration} (edited "
        f"or removed?); iteration directories under {root}: {present or 'none'}. Write a complete one's "
        "iteration into the tracker, or pass that iteration explicitly.")


def begin_save(root: str, iteration: int) -> str:
    """Create the temporary directory ``save`` writes into (rank 0; collective)."""
    tmp = iteration_dir(root, iteration) + ".tmp"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash
        os.makedirs(tmp)
    barrier()
    return tmp


def commit_save(root: str, iteration: int, tracker: str) -> str:
    """Rename the finished temporary directory into place, then move the tracker (rank 0)."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if rank() == 0:
        if os.path.exists(final):  # re-saving one iteration: swap, keeping one complete copy
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        atomic_write_text(os.path.join(root, tracker), str(iteration))
    barrier()
    return final
