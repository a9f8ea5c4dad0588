"""The adapter checkpoint's descriptor file: its name, the legacy name, and PEFT's look-alike."""

import json

import pytest

from megatron_lora.core.checkpoint.files import (
    DESCRIPTOR_FILE, FORMAT, FORMAT_VERSION, LEGACY_DESCRIPTOR_FILE, descriptor_path, read_descriptor,
)
from megatron_lora.core.checkpoint.errors import CheckpointError

OURS = {"format": FORMAT, "format_version": FORMAT_VERSION, "lora_config": {"rank": 4}, "tensors": {}}


def _write(directory, name, record):
    (directory / name).write_text(json.dumps(record))


def test_descriptor_is_not_named_like_peft_config():
    assert DESCRIPTOR_FILE != "adapter_config.json" and LEGACY_DESCRIPTOR_FILE == "adapter_config.json"


def test_reads_the_descriptor(tmp_path):
    _write(tmp_path, DESCRIPTOR_FILE, OURS)
    assert read_descriptor(str(tmp_path)) == OURS


def test_reads_a_checkpoint_written_under_the_legacy_name(tmp_path):
    _write(tmp_path, LEGACY_DESCRIPTOR_FILE, OURS)
    assert descriptor_path(str(tmp_path)) == str(tmp_path / LEGACY_DESCRIPTOR_FILE)
    assert read_descriptor(str(tmp_path)) == OURS


def test_prefers_the_current_name(tmp_path):
    _write(tmp_path, DESCRIPTOR_FILE, OURS)
    _write(tmp_path, LEGACY_DESCRIPTOR_FILE, {"peft_type": "LORA"})
    assert read_descriptor(str(tmp_path)) == OURS


def test_peft_config_is_refused_by_its_format(tmp_path):
    _write(tmp_path, LEGACY_DESCRIPTOR_FILE, {"peft_type": "LORA", "r": 8})
    with pytest.raises(CheckpointError, match=f"expected format '{FORMAT}' version {FORMAT_VERSION}, found None"):
        read_descriptor(str(tmp_path))


def test_missing_descriptor_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"has no {DESCRIPTOR_FILE}: not a complete megatron_lora adapter"):
        read_descriptor(str(tmp_path))
