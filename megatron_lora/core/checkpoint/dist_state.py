"""The state a dist checkpoint holds (model entries, optionally optimizer and RNG), the record of
the run that wrote it, and its load: screened first, with one readable error."""

from __future__ import annotations

import torch

from megatron_lora.core.checkpoint.dist_ranks import barrier, world
from megatron_lora.core.checkpoint.errors import CheckpointError
from megatron_lora.core.checkpoint.pickle_screen import check_no_pickled_code, damaged_files
from megatron_lora.core.checkpoint.rng_state import restore_rng, rng_sharded_tensors


def _sharded_keys(state) -> set:
    """Checkpoint keys a (nested) sharded state dict asks for."""
    if isinstance(state, dict):
        return set().union(*(_sharded_keys(v) for v in state.values())) if state else set()
    if isinstance(state, (list, tuple)):
        return set().union(*(_sharded_keys(v) for v in state)) if state else set()
    key = getattr(state, "key", None)
    return {key} if isinstance(key, str) else set()


def training_state(sharded: dict, optimizer=None, rng: bool = False, is_loading: bool = False) -> dict:
    """The state a checkpoint holds: ``sharded`` model entries, optionally optimizer and RNG."""
    from megatron_lora.core import compat

    state = {"model": sharded}
    if optimizer is not None:
        state["optimizer"] = compat.optimizer_sharded_state_dict(optimizer, sharded, is_loading=is_loading)
    if rng:
        state["rng"] = rng_sharded_tensors()
    return state


def run_record(params_dtype: torch.dtype) -> dict:
    """What a checkpoint records of the run that wrote it, beyond its tensors: the parallel layout
    (RNG state is per rank, so it only resumes on the same one) and the dtype of its parameters
    (the optimizer state's format depends on it)."""
    from megatron.core import parallel_state as ps

    record = {"world_size": world(), "params_dtype": str(params_dtype).replace("torch.", "")}
    if ps.model_parallel_is_initialized():
        record["layout"] = layout_record()
    return record


def layout_record() -> dict:
    """This run's parallel layout as checkpoints record it (Megatron's parallel state must be set up).

    The expert layout (EP, ETP) is named only where it is not the dense default (EP 1, ETP = TP),
    so a dense run's record, and those of checkpoints saved before experts existed, stay as they were.
    """
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    layout = {"tensor": tp, "pipeline": ps.get_pipeline_model_parallel_world_size(),
              "data": ps.get_data_parallel_world_size()}
    ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    if (ep, etp) != (1, tp):
        layout.update(expert=ep, expert_tensor=etp)
    return layout


def check_saved_state(record: dict, ckpt_dir: str, optimizer=None, rng: bool = False) -> None:
    """Refuse to resume optimizer / RNG state a checkpoint's record says it lacks or cannot give."""
    for flag, wanted in (("has_optimizer", optimizer is not None), ("has_rng", rng)):
        if wanted and not record.get(flag):
            raise CheckpointError(f"{ckpt_dir} was saved without {flag[4:]} state.")
    if rng and record.get("world_size") != world():
        raise CheckpointError(
            f"{ckpt_dir}: RNG state was saved by {record.get('world_size')} ranks, this run has "
            f"{world()}; resume RNG only on the same layout, or load without load_rng.")


def restore_training_state(sharded: dict, loaded: dict, optimizer=None, rng: bool = False) -> None:
    """Put what ``load_dist`` returned for :func:`training_state` back into model, optimizer, RNG."""
    copy_loaded(sharded, loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if rng:
        restore_rng(loaded["rng"])
    barrier()


def copy_loaded(sharded: dict, loaded: dict) -> None:
    """Copy loaded values into the parameters their sharded entries were built from.

    Megatron keys stack the layers (the layer index is a sharded offset), so names do not map
    back to modules; the entries do. Plain entries are loaded in place already; factories (the
    SwiGLU ``linear_fc1`` split) return a new tensor.
    """
    with torch.no_grad():
        for key, entry in sharded.items():
            value = loaded[key]
            if value.data_ptr() != entry.data.data_ptr():
                entry.data.copy_(value)


def _missing_keys(err: BaseException) -> list:
    """Tensor names a failed torch DCP load did not find (its per-rank KeyErrors)."""
    failures = getattr(err, "failures", None) or {}
    found = set()
    for failure in failures.values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, KeyError) and exc.args:
            found.add(repr(exc.args[0]))
    return sorted(found)


def load_dist(state: dict, ckpt_dir: str, retry_hint: str = "Load an earlier checkpoint.") -> dict:
    """``dist_checkpointing.load`` after the safety screen, with one readable error."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    check_no_pickled_code(ckpt_dir, requested=_sharded_keys(state))
    try:
        return dist_checkpointing.load(state, ckpt_dir)
    except (Exception, CheckpointException) as err:  # the latter is a BaseException; torch
        # raises it on every rank when any rank cannot read its part
        missing = _missing_keys(err)
        if missing:
            raise CheckpointError(
                f"{ckpt_dir} has no tensor {', '.join(missing[:4])}, which this model needs: the "
                "checkpoint was saved from a model with other flags (tied / untied embeddings "
                "--untie-embeddings-and-output-weights, layer count, LoRA targets).") from err
        damaged = damaged_files(ckpt_dir)
        where = f"{', '.join(damaged[:3])} in {ckpt_dir}" if damaged else ckpt_dir
        raise CheckpointError(
            f"{where}: the checkpoint files could not be read ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''}); a file is truncated or "
            f"corrupted, or the checkpoint lacks tensors this model needs. {retry_hint}") from err
