"""Base-model checkpoints: the whole model (pretraining) or its merged / frozen base weights.

Layout, Megatron-LM's: ``root/iter_XXXXXXX/`` is a ``torch_dist`` checkpoint of the model's
``sharded_state_dict`` (the same keys Megatron-LM writes for the same architecture), and
``root/latest_checkpointed_iteration.txt`` names the newest complete one. Besides the tensors:

* ``model_args.json``: the architecture flags (``pretrain_args.MODEL_ARG_NAMES``), so a run that
  loads the checkpoint with other sizes fails with the flag that differs, not a shape error;
* optionally the optimizer and RNG state (as tensors) for resuming pretraining.

LoRA tensors are never part of a base checkpoint (see ``core/checkpoint/adapter.py`` for adapters); entries
Megatron stores as pickled objects (``_extra_state``) are left out, so loading never unpickles.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_lora.core.checkpoint import atomic_save, dist_ranks, dist_state, orphans, pickle_screen
from megatron_lora.core.checkpoint.errors import CheckpointError
from megatron_lora.core.checkpoint.files import MODEL_ARGS_FILE, MODEL_TRACKER
from megatron_lora.core.inject import model_chunks
from megatron_lora.core.layers import is_lora_key



def base_sharded_state_dict(model, metadata: Optional[dict] = None) -> dict:
    """Every base tensor of the model's sharded state dict (all chunks), LoRA factors left out.

    ``metadata`` is the checkpoint's content metadata when loading (how it was sharded, e.g.
    Megatron-LM's ``singleton_local_shards``); None means Megatron's defaults, used on save.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out = {}
    for chunk in model_chunks(model):
        module = getattr(chunk, "module", chunk)  # DDP / Float16Module wrappers
        for key, value in module.sharded_state_dict(metadata=metadata).items():
            if is_lora_key(key) or key.endswith("_extra_state") or isinstance(value, ShardedObject):
                continue
            out[key] = value
    return out


def latest_iteration(root: str) -> Optional[int]:
    """The newest COMPLETE model checkpoint under ``root``, or None."""
    return atomic_save.latest_iteration(root, MODEL_TRACKER)


def resolve(path: str) -> str:
    """The iteration directory ``path`` means: itself, or its tracker's latest under a root."""
    if os.path.exists(os.path.join(path, ".metadata")):
        return path
    tracker = os.path.join(path, MODEL_TRACKER)
    if os.path.exists(tracker) and open(tracker, encoding="utf-8").read().strip() == "release":
        return os.path.join(path, "release")  # Megatron-LM's name for a converted checkpoint
    iteration = latest_iteration(path)
    if iteration is None:
        raise CheckpointError(f"{path}: no checkpoint ({MODEL_TRACKER} and .metadata are both missing); "
                              "pass a directory written by --save.")
    atomic_save.check_iteration_exists(path, iteration, MODEL_TRACKER)
    return atomic_save.iteration_dir(path, iteration)


def read_model_args(path: str) -> Optional[dict]:
    """The architecture flags saved with a checkpoint (``model_args.json``; for a checkpoint that
    Megatron-LM wrote, the same fields of the ``args`` in its ``common.pt``), or None when it has neither."""
    ckpt_dir = resolve(path)
    file = os.path.join(ckpt_dir, MODEL_ARGS_FILE)
    if not os.path.exists(file):
        return megatron_lm_model_args(ckpt_dir)
    with open(file, encoding="utf-8") as f:
        return json.load(f)


# The architecture fields of model_args.json (training.pretrain_args.MODEL_ARG_NAMES; core does not
# import training) that Megatron-LM's args hold too, under the same names but one. Not
# tokenizer_type: Megatron-LM's tokenizers are not the training script's; the vocabulary size is.
MEGATRON_LM_ARCH_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "swiglu", "normalization", "norm_epsilon", "position_embedding_type",
    "rotary_base", "max_position_embeddings", "untie_embeddings_and_output_weights",
    "add_bias_linear", "add_qkv_bias", "padded_vocab_size",
    "num_experts", "moe_router_topk", "moe_shared_expert_intermediate_size",
    "qk_layernorm", "moe_ffn_hidden_size", "moe_router_pre_softmax",
)
_MEGATRON_LM_NAME = {"norm_epsilon": "layernorm_epsilon"}


def megatron_lm_common_state(ckpt_dir: str) -> Optional[dict]:
    """The non-tensor state Megatron-LM's ``save_checkpoint`` wrote with a ``torch_dist`` checkpoint
    (``args``, ``iteration``, ...), read weights-only; None when there is none.

    megatron-core up to 0.18 keeps it in ``common.pt``; 0.19 in the checkpoint itself, as the
    object ``common_state``, which ``load_common_state_dict`` reads as bytes and then weights-only.
    """
    import torch
    from megatron.core import dist_checkpointing

    if os.path.exists(os.path.join(ckpt_dir, "common.pt")):
        pickle_screen.check_common_state(ckpt_dir)  # weights-only: plain data only
        return torch.load(os.path.join(ckpt_dir, "common.pt"), map_location="cpu", weights_only=True)
    pickle_screen.check_no_pickled_code(ckpt_dir, requested=set())  # screens .metadata before reading it
    if not any(key.startswith("common_state") for key in _metadata_keys(ckpt_dir)):
        return None
    pickle_screen.allow_megatron_lm_args()
    return dist_checkpointing.load_common_state_dict(ckpt_dir)


def _metadata_keys(ckpt_dir: str) -> list:
    with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
        return list(pickle_screen.MetadataUnpickler(f).load().state_dict_metadata)


def megatron_lm_model_args(ckpt_dir: str) -> Optional[dict]:
    """The architecture record of a checkpoint Megatron-LM wrote, from the ``args`` its
    ``save_checkpoint`` keeps with it; None when there are none."""
    args = (megatron_lm_common_state(ckpt_dir) or {}).get("args")
    if args is None:
        return None
    record = {field: getattr(args, _MEGATRON_LM_NAME.get(field, field)) for field in MEGATRON_LM_ARCH_FIELDS
              if hasattr(args, _MEGATRON_LM_NAME.get(field, field))}
    heads = record.get("num_attention_heads")
    if heads and record.get("kv_channels") == record.get("hidden_size", 0) // heads:
        record["kv_channels"] = None  # Megatron-LM fills in the default; model_args.json keeps None
    return record


def save_model(model, root: str, iteration: int, model_args: dict, optimizer=None,
               save_rng: bool = False, record: Optional[dict] = None) -> str:
    """Write the base weights (and optionally optimizer / RNG state); collective over all ranks.
    ``record``: further JSON fields kept in ``model_args.json`` for the caller."""
    from megatron.core import dist_checkpointing

    tmp = atomic_save.begin_save(root, iteration)
    with orphans.save_without_orphans():
        dist_checkpointing.save(dist_state.training_state(base_sharded_state_dict(model), optimizer, save_rng), tmp)
    run_record = dist_state.run_record(next(p for chunk in model_chunks(model) for p in chunk.parameters()).dtype)
    if dist_ranks.rank() == 0:
        record = dict(model_args, iteration=iteration, has_optimizer=optimizer is not None,
                      has_rng=save_rng, **run_record, **(record or {}))
        atomic_save.atomic_write_text(os.path.join(tmp, MODEL_ARGS_FILE), json.dumps(record, indent=2))
    return atomic_save.commit_save(root, iteration, MODEL_TRACKER)


def load_model(model, path: str, optimizer=None, load_rng: bool = False) -> int:
    """Load base weights (any TP / PP layout) from ``path`` (a root or an iteration directory).

    Also reads Megatron-LM ``torch_dist`` checkpoints of the same architecture: the keys are the
    model's own, only tensors are requested, and the checkpoint's content metadata is honoured.

    Returns the checkpoint's iteration (0 when it does not record one). Collective.
    """
    ckpt_dir = resolve(path)
    saved = read_model_args(ckpt_dir) or {}
    dist_state.check_saved_state(saved, ckpt_dir, optimizer, load_rng)
    from megatron.core import dist_checkpointing

    pickle_screen.check_common_state(ckpt_dir)  # content metadata lives in common.pt: screen it first
    sharded = base_sharded_state_dict(model, metadata=dist_checkpointing.load_content_metadata(ckpt_dir))
    loaded = dist_state.load_dist(dist_state.training_state(sharded, optimizer, load_rng, is_loading=True), ckpt_dir)
    dist_state.restore_training_state(sharded, loaded, optimizer, load_rng)
    return int(saved.get("iteration", 0))
