"""Leaving a run cleanly before it is killed: a signal (Slurm preemption) or a time budget.

Megatron-LM's flags and behaviour: ``--exit-signal-handler`` installs a handler for
``--exit-signal`` (SIGTERM by default; Slurm's ``--signal=USR1@SECONDS`` suits SIGUSR1) that only
RECORDS the signal. The training loop asks :meth:`ExitCheck.reason` once per iteration, after
the optimizer step; every rank then takes part in one tiny all-reduce (MAX), so the ranks agree
to stop at the same iteration even when the signal reaches them at different times (or reaches
only some of them), save a complete checkpoint together, and exit 0.

    signal -> handler sets a flag ----------------------------.
    end of iteration k: all_reduce(MAX, [flag, time is up]) --+--> every rank: save iter_k, exit 0

``--exit-duration-in-mins`` rides on the same all-reduce, so the time budget and the signal cost
one collective per iteration together (none when neither is asked for).

Nothing is done inside the handler itself: a save started from a signal handler would run in the
middle of whatever collective the rank was in, and the other ranks would not join it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Optional

import torch

EXIT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

# Values of ``metrics.json``'s "exit_reason": a launcher requeues a job on these two (the run
# was stopped from outside and wants to continue), not on --exit-interval (stopped on purpose).
SIGNAL, DURATION, INTERVAL = "signal", "duration", "interval"
RESUMABLE = (SIGNAL, DURATION)


class ExitCheck:
    """Per-iteration "should all ranks stop now?" for the signal handler and the time budget.

    Args:
        signal_name: the signal to catch (one of ``EXIT_SIGNALS``), or None for no handler.
        duration_mins: the time budget in minutes from ``start``, or None.
        start: ``time.time()`` when the run started.
    """

    def __init__(self, signal_name: Optional[str], duration_mins: Optional[float], start: float):
        self.signal_name = signal_name
        self.duration_mins = duration_mins
        self.start = start
        self.received = False
        self._previous = None
        if signal_name is not None:
            self._signum = getattr(signal, signal_name)
            self._previous = signal.signal(self._signum, self._record)

    def _record(self, signum, frame) -> None:
        self.received = True

    @property
    def active(self) -> bool:
        return self.signal_name is not None or self.duration_mins is not None

    def reason(self) -> Optional[str]:
        """SIGNAL, DURATION or None, the same on every rank (collective when active)."""
        if not self.active:
            return None
        import torch.distributed as dist

        time_up = self.duration_mins is not None and (time.time() - self.start) / 60.0 > self.duration_mins
        # device 0 is the rank's GPU, or the CPU under megatron_lora.cpu (gloo)
        flags = torch.tensor([float(self.received), float(time_up)], device=torch.cuda.current_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item():
            return SIGNAL
        return DURATION if flags[1].item() else None

    def describe(self, reason: str) -> str:
        if reason == SIGNAL:
            return f"{self.signal_name} received (--exit-signal-handler)"
        return f"--exit-duration-in-mins {self.duration_mins:g} reached"

    def close(self) -> None:
        """Put the previous handler back (a run inside a longer-lived process, e.g. tests)."""
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
            self._previous = None


def resumable(save_dir: str) -> bool:
    """Did the last run that wrote ``save_dir`` stop early on a signal or its time budget?

    Read from its ``metrics.json`` (written by rank 0 after the final save); the Slurm script
    requeues the job when this is true. False when the file is missing or unreadable.
    """
    try:
        with open(os.path.join(save_dir, "metrics.json"), encoding="utf-8") as f:
            return json.load(f).get("exit_reason") in RESUMABLE
    except (OSError, ValueError):
        return False
