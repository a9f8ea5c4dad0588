"""A save that fails midway (disk full, quota, a lost mount) is one line: why, and what is kept."""

import argparse
import errno

import pytest

from megatron_lora import LoRAConfig
from megatron_lora.core.checkpoint import adapter
from megatron_lora.core.checkpoint.errors import CheckpointError
from megatron_lora.training import loop


def _args(save, lora=True):
    return argparse.Namespace(lora=LoRAConfig(rank=4) if lora else None, save=str(save), no_save_optim=False,
                              no_save_rng=False, pretrained_checkpoint=None, lora_plus_ratio=None)


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_names_the_reason_and_the_intact_checkpoint(tmp_path, monkeypatch):
    save = tmp_path / "lora"
    save.mkdir()
    (save / "latest_adapter_iteration.txt").write_text("4")
    monkeypatch.setattr(adapter, "save_adapter", _full_disk)
    monkeypatch.setattr(loop, "model_args", lambda args: {})  # the record of the architecture: not under test
    with pytest.raises(CheckpointError) as err:
        loop.save(_args(save), None, None, iteration=6, consumed_samples=24, final=False)
    assert str(err.value) == (f"--save {save}: saving iteration 6 failed (No space left on device); "
                              "the latest complete checkpoint, iteration 4, is intact.")


def test_first_save_failing_says_there_was_nothing_before(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter, "save_adapter", _full_disk)
    monkeypatch.setattr(loop, "model_args", lambda args: {})  # the record of the architecture: not under test
    with pytest.raises(CheckpointError, match="failed \\(No space left on device\\); no earlier checkpoint"):
        loop.save(_args(tmp_path / "new"), None, None, iteration=2, consumed_samples=8, final=False)
