"""Our ``common.pt`` screen must leave torch's weights-only allow-list as megatron-core set it.

Megatron-LM keeps its ``args`` (an ``argparse.Namespace``) in every checkpoint's ``common.pt`` and
reads it back with ``torch.load(weights_only=True)``, relying on megatron-core's import-time
``add_safe_globals``. A screen that allowed the Namespace with ``with safe_globals([...])``
unregistered it on exit, so after our first check no Megatron-LM checkpoint loaded any more.
"""

import argparse

import torch
from megatron.core.transformer.enums import AttnBackend

from megatron_lora.core.checkpoint.pickle_screen import check_common_state


def megatron_lm_common_state():
    """What Megatron-LM's save_checkpoint puts in common.pt: args (with a dtype and an enum), etc."""
    args = argparse.Namespace(lr=1e-4, params_dtype=torch.float32, attention_backend=AttnBackend.auto,
                              tensor_model_parallel_size=2, save="/ckpt/base")
    return {"args": args, "checkpoint_version": 3.0, "iteration": 7}


def test_megatron_lm_common_pt_still_loads_weights_only_after_our_check(tmp_path):
    torch.save(megatron_lm_common_state(), tmp_path / "common.pt")
    # What megatron-core's import does from 0.14 on (megatron.core.safe_globals), whatever release runs.
    torch.serialization.add_safe_globals([argparse.Namespace, AttnBackend])
    check_common_state(str(tmp_path))
    check_common_state(str(tmp_path))  # idempotent
    loaded = torch.load(tmp_path / "common.pt", map_location="cpu", weights_only=True)  # Megatron-LM's read
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    assert loaded["args"].tensor_model_parallel_size == 2 and loaded["iteration"] == 7
    assert loaded["args"].attention_backend is AttnBackend.auto
