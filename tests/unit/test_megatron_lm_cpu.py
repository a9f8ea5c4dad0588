"""``MEGATRON_LORA_CPU``: asked for by the environment, and a strict no-op on a host with CUDA.

What it answers on a host without CUDA is tested by running the real Megatron-LM
(``tests/distributed/test_megatron_lm_real.py``)."""

import pytest
import torch

from megatron_lora.training import megatron_lm_cpu


@pytest.mark.parametrize("value, wanted", [(None, False), ("0", False), ("", False), ("1", True)])
def test_cpu_mode_is_asked_for_by_the_environment(monkeypatch, value, wanted):
    if value is None:
        monkeypatch.delenv(megatron_lm_cpu.ENV, raising=False)
    else:
        monkeypatch.setenv(megatron_lm_cpu.ENV, value)
    assert megatron_lm_cpu.requested() is wanted


def test_cpu_mode_patches_nothing_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(megatron_lm_cpu, "_ENABLED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    names = ("device_count", "set_device", "get_rng_state", "set_rng_state", "current_device", "synchronize")
    before = {name: getattr(torch.cuda, name) for name in names}
    assert megatron_lm_cpu.enable_megatron_lm_cpu() is False
    assert {name: getattr(torch.cuda, name) for name in names} == before
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in __import__("os").environ
    assert megatron_lm_cpu._ENABLED is False
