"""Adapter checkpoints: only the LoRA factors, under any TP / PP layout (docs/design.md §7).

Two formats:

1. **Adapter-only Megatron dist checkpoint** (``torch_dist``): ``save_adapter(model, root, it)``
   writes ``root/iter_0000010/`` holding the LoRA ``ShardedTensor``s (each with its declared TP
   axis, PP-aware keys and replica ids, see ``layers.sharded_state_dict``), optionally the
   optimizer and RNG state for resume, and ``lora_adapter.json`` (format version, LoRAConfig,
   every tensor's logical shape). It is written to a temporary sibling and renamed; only then
   does ``root/latest_adapter_iteration.txt`` move, so a crash mid-save leaves the previous
   checkpoint as the latest. ``load_adapter`` reshards to the model's layout on load.
2. **Full (unsharded) adapter** in safetensors, keyed by qualified name with global layer numbers
   (a TP=1 export, or an imported PEFT adapter). ``load_full_adapter`` slices each rank's shard
   along the layer's DECLARED layout with strict checks (never by guessing from a shape mismatch,
   docs/design.md §10, trap 11). ``gather_full_adapter`` brings it onto one rank with tensor
   messages whose bytes do not grow with the world size (``gather.py``, docs/design.md §16).

The frozen base is never written here: it loads from its own checkpoint.
Nothing here unpickles arbitrary objects: full adapters are safetensors; a dist checkpoint holds
only tensors (RNG state included), its ``.metadata`` is screened with an allow-list unpickler
and any pickled byte item is refused before Megatron / torch read the files.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Union

import torch

from megatron_lora.core import collectives as C
from megatron_lora.core.checkpoint import atomic_save, dist_ranks, dist_state, gather, orphans
from megatron_lora.core.checkpoint.errors import CheckpointError
from megatron_lora.core.checkpoint.files import (
    ADAPTER_TRACKER, CONFIG_FIELDS_THAT_MUST_MATCH, DESCRIPTOR_FILE, FIELDS_CHECKED_BY_VALUE, FORMAT, FORMAT_VERSION,
    FULL_ADAPTER_FILE, read_descriptor, saved_config_value,
)
from megatron_lora.core.config import LoRAConfig
from megatron_lora.core.inject import lora_modules, model_chunks
from megatron_lora.core.layers import is_lora_key

def _model_config(model) -> LoRAConfig:
    configs = {m.lora_config for m in lora_modules(model)}
    if len(configs) != 1:
        raise CheckpointError(
            f"expected a model with one LoRA config, found {len(configs)}; call apply_lora(model, cfg) first.")
    return configs.pop()


def _named_factors(model) -> Dict[str, tuple]:
    """{"<global module name>.lora_A": (module, factor)} for this rank's LoRA layers.

    Names are GPTModel names: a HybridModel of pattern ``"*-" * L`` maps its own
    (``core/hybrid.py``), so its adapters load into GPT models and convert to PEFT unchanged.
    """
    from megatron_lora.core import hybrid

    rename = hybrid.gpt_key_of_hybrid if hybrid.is_gpt_like(model) else str
    out = {}
    for m in lora_modules(model):
        if m.lora_init_name is None:
            raise CheckpointError(
                f"{type(m).__name__} has no name yet: call apply_lora(model, cfg) before saving or loading.")
        # A grouped-experts layer holds one adapter per local expert, each under its
        # SequentialMLP name (core/grouped_experts.py): adapters move between the two.
        for adapter in m.expert_adapters() if hasattr(m, "expert_adapters") else (m,):
            for factor in adapter.lora_tensor_names():
                out[rename(f"{adapter.lora_init_name}.{factor}")] = (adapter, factor)
    return out


def _logical_shapes(model) -> Dict[str, List[int]]:
    """Logical shape of every LoRA tensor of the WHOLE model (all PP stages), on every rank.

    Headers over the pipeline group, tensors only: a rank receives the other stages' names and
    shapes once, never once per TP rank or replica (docs/design.md §16)."""
    return {name: list(shape) for name, _, shape in gather.every_stage(_named_factors(model))}


def _check_config(found: dict, cfg: LoRAConfig, where: str) -> None:
    expected = cfg.to_dict()
    fields = [k for k in CONFIG_FIELDS_THAT_MUST_MATCH if k not in FIELDS_CHECKED_BY_VALUE]
    found = {k: saved_config_value(found, k) for k in fields}
    bad = {k: (expected[k], found[k]) for k in fields if found[k] != expected[k]}
    if bad:
        detail = "; ".join(f"{k}: model has {e!r}, checkpoint has {f!r}" for k, (e, f) in bad.items())
        raise CheckpointError(
            f"{where} was saved with another LoRA config ({detail}). Build the model with the "
            "checkpoint's LoRA settings (--lora-rank / --lora-alpha / --lora-target-modules / "
            "--lora-per-projection / --lora-use-dora).")


# ------------------------------------------------------------------- adapter-only dist checkpoint

def lora_sharded_state_dict(model, metadata: Optional[dict] = None) -> dict:
    """The LoRA entries of the model's Megatron sharded state dict (all chunks)."""
    out = {}
    for chunk in model_chunks(model):
        module = getattr(chunk, "module", chunk)  # DDP / Float16Module wrappers
        for key, value in module.sharded_state_dict(metadata=metadata).items():
            if is_lora_key(key):
                out[key] = value
    return out


def save_adapter(model, root: str, iteration: int = 0, optimizer=None, save_rng: bool = False,
                 record: Optional[dict] = None) -> str:
    """Save the adapter (and optionally optimizer / RNG state) as ``root/iter_XXXXXXX``.

    ``record``: JSON fields kept in the descriptor for the caller (the training script keeps its
    consumed samples and the base it trained on). Collective over all ranks. Returns the
    checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    cfg = _model_config(model)
    _refuse_grouped_optimizer_state(model, optimizer)
    tmp = atomic_save.begin_save(root, iteration)
    with orphans.save_without_orphans():
        dist_checkpointing.save(dist_state.training_state(lora_sharded_state_dict(model), optimizer, save_rng), tmp)
    shapes, run = _logical_shapes(model), dist_state.run_record(next(m.lora_A.dtype for m in lora_modules(model)))
    if dist_ranks.rank() == 0:
        descriptor = dict(format=FORMAT, format_version=FORMAT_VERSION, lora_config=cfg.to_dict(),
                          tensors=shapes, has_optimizer=optimizer is not None, has_rng=save_rng,
                          iteration=iteration, **run, **(record or {}))
        atomic_save.atomic_write_text(os.path.join(tmp, DESCRIPTOR_FILE), json.dumps(descriptor, indent=2))
    return atomic_save.commit_save(root, iteration, ADAPTER_TRACKER)


def _refuse_grouped_optimizer_state(model, optimizer) -> None:
    """Grouped experts stack their per-expert factors in one parameter, saved as per-expert
    entries (``core/grouped_experts.py``); Megatron's optimizer checkpoint maps a parameter to ONE
    entry, so it cannot hold their optimizer state. Refused by name rather than failing inside
    Megatron."""
    grouped = sorted({type(m).__name__ for m in lora_modules(model) if hasattr(m, "expert_adapters")})
    if optimizer is not None and grouped:
        raise CheckpointError(
            f"optimizer state of grouped-expert adapters ({', '.join(grouped)}, moe_grouped_gemm) cannot be "
            "checkpointed yet: their stacked per-expert factors have no single checkpoint entry for "
            "Megatron's optimizer state. Save / load the adapter without optimizer state (optimizer=None; "
            "the training script: --no-save-optim), or build the experts without moe_grouped_gemm "
            "(SequentialMLP).")


def latest_iteration(root: str) -> Optional[int]:
    """The newest COMPLETE adapter checkpoint under ``root``, or None."""
    return atomic_save.latest_iteration(root, ADAPTER_TRACKER)


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
        raise CheckpointError(
            f"{where} does not fit this model: " + "; ".join(problems) +
            ". Check --lora-target-modules / --lora-rank and the model size flags.")


def load_adapter(model, root: str, iteration: Optional[int] = None, optimizer=None,
                 load_rng: bool = False) -> int:
    """Load an adapter saved by ``save_adapter`` into ``model`` (any TP / PP layout).

    ``iteration=None`` takes the latest complete checkpoint. Collective over all ranks.
    Returns the iteration loaded.
    """
    _refuse_grouped_optimizer_state(model, optimizer)
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(
                f"no complete adapter checkpoint under {root} ({ADAPTER_TRACKER} is missing).")
    ckpt_dir = atomic_save.iteration_dir(root, iteration)
    atomic_save.check_iteration_exists(root, iteration, ADAPTER_TRACKER)
    descriptor = read_descriptor(ckpt_dir)
    _check_config(descriptor["lora_config"], _model_config(model), ckpt_dir)
    _check_tensors(_logical_shapes(model), descriptor["tensors"], ckpt_dir)
    dist_state.check_saved_state(descriptor, ckpt_dir, optimizer, load_rng)
    sharded = lora_sharded_state_dict(model)
    copies = _load_shared_factors_apart(sharded)
    loaded = dist_state.load_dist(dist_state.training_state(sharded, optimizer, load_rng, is_loading=True), ckpt_dir,
                          "Load an earlier checkpoint (load_adapter(..., iteration=N)).")
    dist_state.restore_training_state(sharded, loaded, optimizer, load_rng)
    _check_shared_copies_equal(copies, ckpt_dir)
    _check_loaded_factors(model, ckpt_dir)
    return iteration


def _entry_name(key: str, entry) -> str:
    """An entry's checkpoint key with its global offsets (an expert's index is one of them)."""
    offsets = getattr(entry, "global_offset", None) or getattr(getattr(entry, "data", None), "global_offset", None)
    return f"{getattr(entry, 'key', key)} at offset {tuple(offsets)}" if offsets else str(getattr(entry, "key", key))


def _load_shared_factors_apart(sharded: dict) -> list:
    """Entries that read into one Parameter (a shared expert adapter, ``core/expert_sharing.py``)
    load into their own buffers, all but the last one of each Parameter (Megatron's optimizer
    maps a Parameter to its last entry, as at save), so ``_check_shared_copies_equal`` can
    compare what the checkpoint holds for each expert. Returns [(key, entry, key, last entry)]."""
    by_param: Dict[int, list] = {}
    for key, entry in sharded.items():
        by_param.setdefault(entry.data.data_ptr(), []).append((key, entry))
    copies = []
    for entries in by_param.values():
        last_key, last = entries[-1]
        for key, entry in entries[:-1]:
            entry.data = torch.empty_like(entry.data)
            copies.append((key, entry, last_key, last))
    return copies


def _check_shared_copies_equal(copies: list, where: str) -> None:
    """A shared adapter loads only from a checkpoint whose experts agree; the lowest rank's first
    difference is raised on all ranks."""
    problem = None
    for key, entry, last_key, last in copies:
        if not torch.equal(entry.data, last.data):
            problem = (f"{where}: the experts' adapters differ ({_entry_name(key, entry)} is not "
                       f"{_entry_name(last_key, last)}), so they cannot load into a model whose experts share "
                       "one adapter (--lora-expert-adapters shared). Load it with --lora-expert-adapters "
                       "per_expert, or load an adapter saved from a shared model.")
            break
    found = gather.first_message(problem)
    if found is not None:
        raise CheckpointError(found)


def _check_loaded_factors(model, where: str) -> None:
    """Every rank's shards are finite floats; the lowest rank's first problem is raised on all
    (one int64 all-reduce when there is none)."""
    problem = None
    for name, (m, factor) in _named_factors(model).items():
        try:
            check_finite_float(name, getattr(m, factor).detach(), where)
        except CheckpointError as err:
            problem = str(err)
            break
    found = gather.first_message(problem)
    if found is not None:
        raise CheckpointError(found)


# ------------------------------------------------------------------------- full (unsharded) adapter

def gather_full_adapter(model, dst: Optional[int] = None) -> Optional[Dict[str, torch.Tensor]]:
    """Every LoRA tensor in its logical (TP=1) form, on the CPU, on global rank ``dst`` (every
    rank with None); None on the other ranks. Collective over all ranks.

    One data-parallel replica gathers each layer over TP onto one rank of its stage, which sends
    it point-to-point to ``dst`` (``checkpoint/gather.py``): ``dst`` receives the adapter once,
    a sender at most its stage's factors, another replica nothing (docs/design.md §16). Expert
    layers at EP > 1 (or expert-TP != TP) come the same way from ``dst``'s expert group, every
    expert under its global name. A
    replicated factor, or any factor at TP = 1 on the CPU, may be the parameter itself: read the
    result, do not write it.
    """
    return gather.gather_adapter(_named_factors(model), dst)


def write_full_adapter(tensors: Dict[str, torch.Tensor], cfg: LoRAConfig, path: str, **metadata: str) -> None:
    """Write logical adapter tensors as one safetensors file (atomic), with their LoRAConfig."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=dict(format=FORMAT, format_version=str(FORMAT_VERSION),
                                          lora_config=json.dumps(cfg.to_dict()), **metadata))
    os.replace(tmp, path)


def save_full_adapter(model, path: str, writer: int = 0) -> None:
    """Write the logical adapter as one safetensors file (global rank ``writer`` gathers and
    writes it; collective)."""
    tensors = gather_full_adapter(model, dst=writer)
    if dist_ranks.rank() == writer:
        write_full_adapter(tensors, _model_config(model), path)
    dist_ranks.barrier()


def read_full_adapter(path: str):
    """(tensors, metadata) of a safetensors adapter file, with a readable error when corrupt."""
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        raise CheckpointError(
            f"{path} is a directory; pass the full adapter file (the {FULL_ADAPTER_FILE} a LoRA run "
            "writes into --save, or the .safetensors file peft-to-megatron writes).")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such adapter file.")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({err}); it may be truncated or corrupted. "
            "Re-export the adapter.")


def load_full_adapter(model, source: Union[str, Dict[str, torch.Tensor]], strict: bool = True) -> None:
    """Load logical adapter tensors into a TP/PP-sharded model: each rank keeps its own slice.

    ``source`` is a safetensors path or a {name: tensor} dict with global layer numbers in the
    names (and global expert indices: each expert rank keeps its own experts, each sliced over the
    layer's expert-TP group). Every tensor is checked against the layer's declared layout;
    ``strict`` also refuses tensors the model has no place for and, on every rank alike, tensors
    of any stage or expert rank that are missing. Collective over all ranks (for the strict check).
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
    if _model_config(model).expert_adapters == "shared":
        _check_experts_agree(tensors, where)
    if strict:
        known = set(_logical_shapes(model))  # every stage's names
        unexpected = sorted(set(tensors) - known)
        if unexpected:
            raise CheckpointError(
                f"{where} has tensors this model has no place for: {unexpected[:6]}. Check the "
                "targets and layer count, or pass strict=False to ignore them.")
        # Every rank checks every stage's and every expert rank's names, so all raise the same error.
        missing = sorted(known - set(tensors))
        if missing:
            more = " ..." if len(missing) > 6 else ""
            raise CheckpointError(
                f"{where} is missing {', '.join(missing[:6])}{more}; the model has LoRA on them. Export the "
                f"adapter with the same targets {list(_model_config(model).target_modules)} and all experts.")
    with torch.no_grad():
        for name, (m, factor) in named.items():
            if name not in tensors:
                raise CheckpointError(
                    f"{where} is missing {name}; the model has LoRA on it. Export the adapter with "
                    f"the same targets {list(m.lora_config.target_modules)}.")
            full = tensors[name]
            check_finite_float(name, full, where)
            _check_full_tensor(name, full, m, factor, where)
            rank, world = C.group_rank(m.lora_group), C.group_size(m.lora_group)
            getattr(m, factor).copy_(m.lora_layout.shard(factor, full, rank, world))


def _check_experts_agree(tensors: Dict[str, torch.Tensor], where: str) -> None:
    """For a model whose experts share one adapter: every expert of a layer has the same tensors
    in ``tensors`` (checked over the whole file, so every rank raises alike)."""
    import re

    first: Dict[str, str] = {}
    for name in sorted(tensors):
        group = re.sub(r"\.local_experts\.\d+\.", ".local_experts.*.", name)
        if group == name:
            continue
        seen = first.setdefault(group, name)
        if seen != name and not torch.equal(tensors[seen], tensors[name]):
            raise CheckpointError(
                f"{where}: the experts' adapters differ ({name} is not {seen}), so they cannot load into "
                "a model whose experts share one adapter (--lora-expert-adapters shared). Load it with "
                "--lora-expert-adapters per_expert, or load an adapter saved from a shared model.")


def check_finite_float(name: str, tensor: torch.Tensor, where: str) -> None:
    """An adapter tensor is floating point and finite; anything else is a broken file or a run that
    diverged, and would only surface later as a NaN loss blamed on the learning rate."""
    if not tensor.is_floating_point():
        raise CheckpointError(f"{where}: {name} has dtype {tensor.dtype}; LoRA factors are floating point. "
                              "The file is not a LoRA adapter, or was written wrongly: export it again.")
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise CheckpointError(f"{where}: {name} holds {bad} non-finite values (NaN / Inf) of {tensor.numel()}; "
                              "the adapter is damaged or its training diverged: use an earlier checkpoint.")


def _check_full_tensor(name, full, m, factor, where) -> None:
    expected = tuple(m.lora_logical_shape(factor))
    found = tuple(full.shape)
    if found == expected:
        return
    world = C.group_size(m.lora_group)
    local = tuple(getattr(m, factor).shape)
    dim = m.lora_layout.partition_dim(factor)
    rank_dim = 0 if factor == "lora_A" else 1
    if len(found) == 2 and found == expected[::-1]:
        hint = "it looks transposed (PEFT and Megatron both store A as [r, in] and B as [out, r])"
    elif len(found) == 2 and found[rank_dim] != expected[rank_dim]:
        hint = f"its LoRA rank is {found[rank_dim]}, the model's is {expected[rank_dim]}: set --lora-rank to match"
        if name.rsplit(".", 2)[-2] in ("linear_qkv", "linear_fc1"):  # fused: A stacks P*r rows per projection
            hint += " (and --lora-per-projection to the adapter's: lora_A then stacks r rows per projection)"
    elif dim is not None and len(found) == 2 and found[dim] % world:
        hint = f"size {found[dim]} on the TP-split dim {dim} does not divide by TP={world}"
    else:
        hint = "the base layer's size differs: check the model size flags"
    raise CheckpointError(
        f"{where}: {name} has shape {found}, expected the logical shape {expected} "
        f"(TP={world}, local shard {local}, split on dim {dim}); {hint}.")
