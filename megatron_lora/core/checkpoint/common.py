"""Low-level checkpoint I/O shared by adapter and base-model checkpoints.

Saves are atomic: a checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed into place, and
only then does the tracker file (``latest_*.txt``) move, so a crash mid-save leaves the previous
checkpoint as the latest. RNG state is stored as tensors, never pickled, and every load first
screens the dist checkpoint's ``.metadata`` so that reading it cannot run code.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import sys
from typing import Optional

import torch
import torch.distributed as dist


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or cannot be read; the message says what to do."""


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


_saving = False
_fork_hook_installed = False


def _die_with_parent() -> None:
    """In a child forked during a save: receive SIGKILL when the rank (its parent) dies."""
    if not _saving or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the rank died between fork and prctl
        os._exit(1)


@contextlib.contextmanager
def save_without_orphans():
    """Run a dist-checkpoint save that leaves no process behind, however the rank ends.

    Megatron's writer forks writer processes for each save; a rank killed mid-save (SIGKILL, a
    preempted node) would leave them behind holding the tensors they write. Children forked while
    this is active die with the rank, the writer's results server among them: it is forked, not
    spawned (``compat.keep_checkpoint_writer_in_process``).
    """
    global _saving, _fork_hook_installed
    from megatron_lora.core import compat

    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_die_with_parent)
        _fork_hook_installed = True
    _saving = True
    try:
        compat.keep_checkpoint_writer_in_process()  # its server is forked here: it dies with the rank
        yield
    finally:
        _saving = False


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


def rng_sharded_tensors() -> dict:
    """This rank's RNG states as ShardedTensors [world, n] (tensors, so nothing is pickled)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    states.update({f"tracker.{k}": v for k, v in get_cuda_rng_tracker().get_states().items()})
    return {name: ShardedTensor.from_rank_offsets(f"rng_state.{name}", state.clone(), (0, rank(), world()),
                                                  replica_id=0, prepend_axis_num=1)
            for name, state in states.items()}


def restore_rng(loaded: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(loaded["torch"])
    if "cuda" in loaded and torch.cuda.is_available():
        torch.cuda.set_rng_state(loaded["cuda"])
    tracker = {k[len("tracker."):]: v for k, v in loaded.items() if k.startswith("tracker.")}
    get_cuda_rng_tracker().set_states(tracker)


# torch DCP unpickles ``.metadata`` with plain pickle and byte items with weights_only=False:
# check both before Megatron touches a checkpoint, so loading cannot run code from the files.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in _DCP_MODULES or module.startswith("megatron.core.dist_checkpointing."):
            # Plain data classes of torch DCP / Megatron (e.g. MCoreSavePlan): types, no functions.
            obj = super().find_class(module, name)
            if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING":
                return obj
        elif (module, name) in _ALLOWED_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None),
                                                 (torch.dtype, torch.layout, torch.memory_format))):
            return super().find_class(module, name)
        raise CheckpointError(
            f"checkpoint metadata references {module}.{name}, which a megatron_lora adapter "
            "checkpoint never contains; refusing to load it (it could run code).")


def check_no_pickled_code(ckpt_dir: str, requested: Optional[set] = None) -> None:
    """Refuse a dist checkpoint whose loading could run code from its files.

    torch DCP unpickles ``.metadata`` and pickled byte items (``requested`` keys only, or all when
    None) without restriction, and megatron-core 0.13 reads ``common.pt`` with
    ``weights_only=False``: ``.metadata`` goes through an allow-list unpickler, requested byte
    items are refused, and ``common.pt`` must load with ``weights_only=True``.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = os.path.join(ckpt_dir, ".metadata")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(f"{path} is missing or corrupted ({err}); load an earlier checkpoint.")
    objects = sorted(k for k, v in metadata.state_dict_metadata.items()
                     if isinstance(v, BytesStorageMetadata) and (requested is None or k in requested))
    if objects:
        raise CheckpointError(
            f"{ckpt_dir} holds pickled objects {objects[:4]}, which megatron_lora never writes and "
            "torch would unpickle without restriction; refusing to load it.")
    check_common_state(ckpt_dir)


def allow_megatron_lm_args() -> None:
    """Let ``torch.load(weights_only=True)`` read the ``args`` Megatron-LM keeps in ``common.pt``.

    ``argparse.Namespace`` is plain data; megatron-core registers it (and the enums Megatron-LM's
    args hold) at import with ``add_safe_globals``, which is idempotent, so doing the same here
    changes nothing once megatron.core is imported. Never ``with safe_globals([...])``: on exit
    that context manager unregisters the names it lists, including ones registered before it, and
    every later weights-only load of a Megatron-LM checkpoint (ours, Megatron-LM's own resume)
    then fails with "Unsupported global: GLOBAL argparse.Namespace".
    """
    import argparse

    torch.serialization.add_safe_globals([argparse.Namespace])


def check_common_state(ckpt_dir: str) -> None:
    """Refuse a ``common.pt`` that ``torch.load(weights_only=True)`` cannot read (it could run code)."""
    path = os.path.join(ckpt_dir, "common.pt")
    if not os.path.exists(path):
        return
    allow_megatron_lm_args()
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} holds objects beyond tensors and plain data ({str(err).splitlines()[-1][:160]}); "
            "refusing to load it, since unpickling it could run code.") from None


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
        record["layout"] = {"tensor": ps.get_tensor_model_parallel_world_size(),
                            "pipeline": ps.get_pipeline_model_parallel_world_size(),
                            "data": ps.get_data_parallel_world_size()}
    return record


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


def damaged_files(ckpt_dir: str) -> list:
    """Data files of a dist checkpoint that are missing or shorter than its ``.metadata`` says."""
    try:
        with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
            storage = getattr(_MetadataUnpickler(f).load(), "storage_data", None) or {}
    except (OSError, pickle.UnpicklingError, EOFError, CheckpointError):
        return []
    needed = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    bad = []
    for name, size in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path) or os.path.getsize(path) < size:
            bad.append(name)
    return bad
