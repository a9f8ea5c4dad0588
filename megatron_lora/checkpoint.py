"""Adapter checkpoints: only the LoRA factors, under any TP / PP layout (DESIGN §5).

Two formats:

1. **Adapter-only Megatron dist checkpoint** (``torch_dist``): ``save_adapter(model, root, it)``
   writes ``root/iter_0000010/`` holding the LoRA ``ShardedTensor``s (each with its declared TP
   axis, PP-aware keys and replica ids, see ``layers.sharded_state_dict``), optionally the
   optimizer and RNG state for resume, and ``adapter_config.json`` (format version, LoRAConfig,
   every tensor's logical shape). It is written to a temporary sibling and renamed; only then
   does ``root/latest_adapter_iteration.txt`` move, so a crash mid-save leaves the previous
   checkpoint as the latest. ``load_adapter`` reshards to the model's layout on load.
2. **Full (unsharded) adapter** in safetensors, keyed by qualified name with global layer numbers
   (a TP=1 export, or an imported PEFT adapter). ``load_full_adapter`` slices each rank's shard
   along the layer's DECLARED layout with strict checks (never by guessing from a shape mismatch,
   LESSONS 11).

The frozen base is never written here: it loads from its own checkpoint.
Nothing here unpickles arbitrary objects: full adapters are safetensors; a dist checkpoint holds
only tensors (RNG state included), its ``.metadata`` is screened with an allow-list unpickler
and any pickled byte item is refused before Megatron / torch read the files.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from typing import Dict, List, Optional, Union

import torch
import torch.distributed as dist

from megatron_lora import collectives as C
from megatron_lora.config import LoRAConfig
from megatron_lora.inject import lora_modules, model_chunks
from megatron_lora.layers import LORA_FACTORS

FORMAT = "megatron_lora.adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
LATEST_FILE = "latest_adapter_iteration.txt"
# Fields that change what the saved numbers mean; dropout / init / seed only affect training.
CONFIG_FIELDS_THAT_MUST_MATCH = ("rank", "alpha", "use_rslora", "target_modules")


class AdapterCheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message says what to do."""


# ------------------------------------------------------------------------------------ helpers

def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_ranks(obj) -> list:
    """``obj`` from every rank (small Python objects only)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _model_config(model) -> LoRAConfig:
    configs = {m.lora_config for m in lora_modules(model)}
    if len(configs) != 1:
        raise AdapterCheckpointError(
            f"expected a model with one LoRA config, found {len(configs)}; call apply_lora(model, cfg) first.")
    return configs.pop()


def _named_factors(model) -> Dict[str, tuple]:
    """{"<global module name>.lora_A": (module, factor)} for this rank's LoRA layers."""
    out = {}
    for m in lora_modules(model):
        if m.lora_init_name is None:
            raise AdapterCheckpointError(
                f"{type(m).__name__} has no name yet: call apply_lora(model, cfg) before saving or loading.")
        for factor in LORA_FACTORS:
            out[f"{m.lora_init_name}.{factor}"] = (m, factor)
    return out


def _logical_shapes(model) -> Dict[str, List[int]]:
    """Logical shape of every LoRA tensor of the WHOLE model (all PP stages)."""
    mine = {name: list(m.lora_logical_shape(f)) for name, (m, f) in _named_factors(model).items()}
    merged = {}
    for shapes in _all_ranks(mine):
        merged.update(shapes)
    return merged


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_config(found: dict, cfg: LoRAConfig, where: str) -> None:
    expected = cfg.to_dict()
    bad = {k: (expected[k], found.get(k)) for k in CONFIG_FIELDS_THAT_MUST_MATCH
           if found.get(k) != expected[k]}
    if bad:
        detail = "; ".join(f"{k}: model has {e!r}, checkpoint has {f!r}" for k, (e, f) in bad.items())
        raise AdapterCheckpointError(
            f"{where} was saved with another LoRA config ({detail}). Build the model with the "
            "checkpoint's LoRA settings (--lora-rank / --lora-alpha / --lora-target-modules).")


# ------------------------------------------------------------------- adapter-only dist checkpoint

def lora_sharded_state_dict(model, metadata: Optional[dict] = None) -> dict:
    """The LoRA entries of the model's Megatron sharded state dict (all chunks)."""
    out = {}
    for chunk in model_chunks(model):
        module = getattr(chunk, "module", chunk)  # DDP / Float16Module wrappers
        for key, value in module.sharded_state_dict(metadata=metadata).items():
            if key.endswith((".lora_A", ".lora_B")):
                out[key] = value
    return out


def _rng_sharded_tensors() -> dict:
    """This rank's RNG states as ShardedTensors [world, n] (tensors, so nothing is pickled)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    states.update({f"tracker.{k}": v for k, v in get_cuda_rng_tracker().get_states().items()})
    return {name: ShardedTensor.from_rank_offsets(f"rng_state.{name}", state.clone(), (0, _rank(), _world()),
                                                  replica_id=0, prepend_axis_num=1)
            for name, state in states.items()}


def _restore_rng(loaded: dict) -> None:
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
        raise AdapterCheckpointError(
            f"checkpoint metadata references {module}.{name}, which a megatron_lora adapter "
            "checkpoint never contains; refusing to load it (it could run code).")


def _check_no_pickled_code(ckpt_dir: str) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = os.path.join(ckpt_dir, ".metadata")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise AdapterCheckpointError(f"{path} is missing or corrupted ({err}); load an earlier checkpoint.")
    objects = sorted(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    if objects:
        raise AdapterCheckpointError(
            f"{ckpt_dir} holds pickled objects {objects[:4]}, which megatron_lora never writes and "
            "torch would unpickle without restriction; refusing to load it.")


def save_adapter(model, root: str, iteration: int = 0, optimizer=None, save_rng: bool = False) -> str:
    """Save the adapter (and optionally optimizer / RNG state) as ``root/iter_XXXXXXX``.

    Collective over all ranks. Returns the checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    cfg = _model_config(model)
    final = os.path.join(root, f"iter_{iteration:07d}")
    tmp = final + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash
        os.makedirs(tmp)
    _barrier()
    sharded = lora_sharded_state_dict(model)
    state = {"model": sharded}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(sharded)
    if save_rng:
        state["rng"] = _rng_sharded_tensors()
    dist_checkpointing.save(state, tmp)
    shapes = _logical_shapes(model)
    if _rank() == 0:
        descriptor = dict(format=FORMAT, format_version=FORMAT_VERSION, lora_config=cfg.to_dict(),
                          tensors=shapes, has_optimizer=optimizer is not None, has_rng=save_rng,
                          world_size=_world(), iteration=iteration)
        _atomic_write_text(os.path.join(tmp, CONFIG_FILE), json.dumps(descriptor, indent=2))
        if os.path.exists(final):  # re-saving one iteration: swap, keeping one complete copy
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _atomic_write_text(os.path.join(root, LATEST_FILE), str(iteration))
    _barrier()
    return final


def latest_iteration(root: str) -> Optional[int]:
    """The newest COMPLETE adapter checkpoint under ``root``, or None."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.exists(path):
        return None
    return int(open(path, encoding="utf-8").read().strip())


def read_descriptor(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            descriptor = json.load(f)
    except FileNotFoundError:
        raise AdapterCheckpointError(
            f"{ckpt_dir} has no {CONFIG_FILE}: not a complete megatron_lora adapter checkpoint "
            "(an interrupted save?). Load the latest complete one with load_adapter(model, root).")
    except json.JSONDecodeError as err:
        raise AdapterCheckpointError(f"{path} is corrupted ({err}); load an earlier checkpoint.")
    if descriptor.get("format") != FORMAT or descriptor.get("format_version") != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, found "
            f"{descriptor.get('format')!r} version {descriptor.get('format_version')!r}.")
    return descriptor


def _check_tensors(expected: Dict[str, List[int]], found: Dict[str, List[int]], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = {n: (expected[n], found[n]) for n in expected if n in found and list(found[n]) != list(expected[n])}
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for name, (e, f) in list(wrong.items())[:6]:
        problems.append(f"{name}: model expects logical shape {tuple(e)}, checkpoint has {tuple(f)}")
    if problems:
        raise AdapterCheckpointError(
            f"{where} does not fit this model: " + "; ".join(problems) +
            ". Check --lora-target-modules / --lora-rank and the model size flags.")


def load_adapter(model, root: str, iteration: Optional[int] = None, optimizer=None,
                 load_rng: bool = False) -> int:
    """Load an adapter saved by ``save_adapter`` into ``model`` (any TP / PP layout).

    ``iteration=None`` takes the latest complete checkpoint. Collective over all ranks.
    Returns the iteration loaded.
    """
    from megatron.core import dist_checkpointing

    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise AdapterCheckpointError(
                f"no complete adapter checkpoint under {root} ({LATEST_FILE} is missing).")
    ckpt_dir = os.path.join(root, f"iter_{iteration:07d}")
    descriptor = read_descriptor(ckpt_dir)
    _check_config(descriptor["lora_config"], _model_config(model), ckpt_dir)
    _check_tensors(_logical_shapes(model), descriptor["tensors"], ckpt_dir)
    if load_rng and descriptor["world_size"] != _world():
        raise AdapterCheckpointError(
            f"{ckpt_dir}: RNG state was saved by {descriptor['world_size']} ranks, this run has "
            f"{_world()}; resume RNG only on the same layout, or load without load_rng.")
    for flag, wanted in (("has_optimizer", optimizer is not None), ("has_rng", load_rng)):
        if wanted and not descriptor[flag]:
            raise AdapterCheckpointError(f"{ckpt_dir} was saved without {flag[4:]} state.")
    _check_no_pickled_code(ckpt_dir)
    sharded = lora_sharded_state_dict(model)
    state = {"model": sharded}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True)
    if load_rng:
        state["rng"] = _rng_sharded_tensors()
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = dist_checkpointing.load(state, ckpt_dir)
    except (Exception, CheckpointException) as err:  # the latter is a BaseException; torch
        # raises it on every rank when any rank cannot read its part
        raise AdapterCheckpointError(
            f"{ckpt_dir}: the checkpoint files could not be read ({type(err).__name__}); a file is "
            "truncated or corrupted. Load an earlier checkpoint (load_adapter(..., iteration=N)).") from err
    with torch.no_grad():
        # Megatron keys stack the layers (the layer index is a sharded offset), so map each
        # loaded tensor back through the parameter its sharded entry was built from. Plain
        # entries are loaded in place already; factories (SwiGLU lora_B) return a new tensor.
        for key, entry in sharded.items():
            value = loaded["model"][key]
            if value.data_ptr() != entry.data.data_ptr():
                entry.data.copy_(value)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if load_rng:
        _restore_rng(loaded["rng"])
    _barrier()
    return iteration


# ------------------------------------------------------------------------- full (unsharded) adapter

def gather_full_adapter(model) -> Dict[str, torch.Tensor]:
    """Every LoRA tensor in its logical (TP=1) form, on every rank; collective over all ranks."""
    full = {}
    for name, (m, factor) in _named_factors(model).items():
        local = getattr(m, factor).detach()
        shards = [local]
        if C.group_size(m.tp_group) > 1:
            shards = [torch.empty_like(local) for _ in range(C.group_size(m.tp_group))]
            dist.all_gather(shards, local.contiguous(), group=m.tp_group)
        full[name] = m.lora_layout.unshard(factor, shards).cpu().contiguous()
    merged = {}
    for part in _all_ranks(full):  # PP stages hold different layers
        merged.update(part)
    return merged


def save_full_adapter(model, path: str) -> None:
    """Write the logical adapter as one safetensors file (rank 0 writes; collective)."""
    from safetensors.torch import save_file

    tensors = gather_full_adapter(model)
    if _rank() == 0:
        tmp = f"{path}.tmp-{os.getpid()}"
        meta = dict(format=FORMAT, format_version=str(FORMAT_VERSION),
                    lora_config=json.dumps(_model_config(model).to_dict()))
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    _barrier()


def read_full_adapter(path: str):
    """(tensors, metadata) of a safetensors adapter file, with a readable error when corrupt."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except FileNotFoundError:
        raise AdapterCheckpointError(f"{path}: no such adapter file.")
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterCheckpointError(
            f"{path}: not a readable safetensors file ({err}); it may be truncated or corrupted. "
            "Re-export the adapter.")


def load_full_adapter(model, source: Union[str, Dict[str, torch.Tensor]], strict: bool = True) -> None:
    """Load logical adapter tensors into a TP/PP-sharded model: each rank keeps its own slice.

    ``source`` is a safetensors path or a {name: tensor} dict with global layer numbers in the
    names. Every tensor is checked against the layer's declared layout; ``strict`` also refuses
    tensors the model has no place for. Collective over all ranks (for the strict check).
    """
    where = "the adapter"
    if isinstance(source, str):
        tensors, meta = read_full_adapter(source)
        where = source
        if "lora_config" in meta:
            _check_config(json.loads(meta["lora_config"]), _model_config(model), where)
    else:
        tensors = source
    named = _named_factors(model)
    if strict:
        known = set()
        for names in _all_ranks(sorted(named)):
            known.update(names)
        unexpected = sorted(set(tensors) - known)
        if unexpected:
            raise AdapterCheckpointError(
                f"{where} has tensors this model has no place for: {unexpected[:6]}. Check the "
                "targets and layer count, or pass strict=False to ignore them.")
    with torch.no_grad():
        for name, (m, factor) in named.items():
            if name not in tensors:
                raise AdapterCheckpointError(
                    f"{where} is missing {name}; the model has LoRA on it. Export the adapter with "
                    f"the same targets {list(m.lora_config.target_modules)}.")
            full = tensors[name]
            _check_full_tensor(name, full, m, factor, where)
            rank, world = C.group_rank(m.tp_group), C.group_size(m.tp_group)
            getattr(m, factor).copy_(m.lora_layout.shard(factor, full, rank, world))


def _check_full_tensor(name, full, m, factor, where) -> None:
    expected = tuple(m.lora_logical_shape(factor))
    found = tuple(full.shape)
    if found == expected:
        return
    world = C.group_size(m.tp_group)
    local = tuple(getattr(m, factor).shape)
    dim = m.lora_layout.partition_dim(factor)
    rank_dim = 0 if factor == "lora_A" else 1
    if len(found) == 2 and found == expected[::-1]:
        hint = "it looks transposed (PEFT and Megatron both store A as [r, in] and B as [out, r])"
    elif len(found) == 2 and found[rank_dim] != expected[rank_dim]:
        hint = f"its LoRA rank is {found[rank_dim]}, the model's is {expected[rank_dim]}: set --lora-rank to match"
    elif dim is not None and len(found) == 2 and found[dim] % world:
        hint = f"size {found[dim]} on the TP-split dim {dim} does not divide by TP={world}"
    else:
        hint = "the base layer's size differs: check the model size flags"
    raise AdapterCheckpointError(
        f"{where}: {name} has shape {found}, expected the logical shape {expected} "
        f"(TP={world}, local shard {local}, split on dim {dim}); {hint}.")
