"""Loading must never run code from checkpoint files (docs/design.md §7)."""

import os
import pickle

import pytest
import torch

from megatron_lora.core.checkpoint.adapter import read_full_adapter
from megatron_lora.core.checkpoint.errors import CheckpointError
from megatron_lora.core.checkpoint.pickle_screen import check_no_pickled_code as _check_no_pickled_code


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating a file stands in for any code


def test_metadata_referencing_code_is_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "pwned")
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match="io.open.*refusing to load"):
        _check_no_pickled_code(str(tmp_path))
    assert not os.path.exists(marker)


def test_missing_metadata_is_a_readable_error(tmp_path):
    with pytest.raises(CheckpointError, match="missing or corrupted"):
        _check_no_pickled_code(str(tmp_path))


def test_checkpoint_with_pickled_object_items_is_refused(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Metadata({"rng_state": BytesStorageMetadata()})))
    with pytest.raises(CheckpointError, match="holds pickled objects \\['rng_state'\\]"):
        _check_no_pickled_code(str(tmp_path))


def test_non_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_full_adapter(str(path))


class _Payload:
    """Stands in for a pickle that would run code: any global outside the allow-list."""


def test_common_state_that_is_not_plain_data_is_refused(tmp_path):
    """megatron-core 0.13 reads common.pt with weights_only=False: screen it first."""
    import argparse

    from megatron_lora.core.checkpoint.pickle_screen import check_common_state

    torch.save({"args": argparse.Namespace(lr=1.0), "iteration": 3}, tmp_path / "common.pt")
    check_common_state(str(tmp_path))  # Megatron-LM's pickled Namespace is plain data: fine
    torch.save({"args": _Payload()}, tmp_path / "common.pt")
    with pytest.raises(CheckpointError, match="common.pt holds objects beyond tensors"):
        check_common_state(str(tmp_path))
