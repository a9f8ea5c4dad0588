"""megatron_lora.training.preemption in one process: the handler only records; resumable() reads metrics."""

import json
import os
import signal

import pytest

from megatron_lora.training.preemption import ExitCheck, resumable


def test_handler_records_the_signal_and_close_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGUSR1)
    check = ExitCheck("SIGUSR1", None, start=0.0)
    try:
        assert check.active and not check.received
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        assert check.received
    finally:
        check.close()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_nothing_to_check_without_handler_or_budget():
    check = ExitCheck(None, None, start=0.0)
    assert not check.active and check.reason() is None  # no collective: works without a group


@pytest.mark.parametrize("reason, expected", [("signal", True), ("duration", True), ("interval", False),
                                              (None, False)])
def test_resumable_reads_the_exit_reason(tmp_path, reason, expected):
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 3, "exit_reason": reason}))
    assert resumable(str(tmp_path)) is expected


def test_resumable_is_false_without_metrics(tmp_path):
    assert resumable(str(tmp_path)) is False
    (tmp_path / "metrics.json").write_text("{not json")
    assert resumable(str(tmp_path)) is False
