"""Reading what a conversion is given: Hugging Face model directories, ``--base`` in any of its
forms (its row norms too, for DoRA imports), and adapters (full adapter files, PEFT directories,
training ``--save`` directories).

Every input is checked before a model is built or a file written; expected problems raise
``ConversionError`` or ``CheckpointError`` with a one-line message.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_lora.core.checkpoint import adapter as adapter_checkpoint
from megatron_lora.core.checkpoint import files
from megatron_lora.core.checkpoint import atomic_save
from megatron_lora.training import model_checkpoint
from megatron_lora.core.config import LoRAConfig
from megatron_lora.hf.mapping import (
    MODULES, Arch, ConversionError, arch_from_model_args, check_hf_config, megatron_flags,
)
from megatron_lora.hf.peft_adapters import PARENT_OF_PART, check_peft_config, megatron_from_peft
from megatron_lora.hf.peft_dora import BaseNorms, row_norms
from megatron_lora.training.pretrain_args import model_args_from_flags

Log = Callable[[str], None]
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def silent(_: str) -> None:
    pass


def read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found; {what}.") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err}).") from None


def check_new_output(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConversionError(f"--output {path} already exists; choose a new path or delete it.")


class HFCheckpoint:
    """A Hugging Face model directory: config.json plus safetensors (one file or an index)."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        self.config = read_json(os.path.join(hf_dir, "config.json"), "pass a Hugging Face model directory")
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            self.files = {n: os.path.join(hf_dir, f) for n, f in read_json(index, "")["weight_map"].items()}
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            self.files = None
        elif any(f.endswith(".bin") for f in os.listdir(hf_dir)):
            raise ConversionError(f"{hf_dir} holds only pytorch .bin weights, which would be unpickled; re-save "
                                  "the model with safetensors (save_pretrained(..., safe_serialization=True)).")
        else:
            raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json.")
        self._stack = contextlib.ExitStack()
        self._open: Dict[str, object] = {}
        if self.files is None:
            path = os.path.join(hf_dir, "model.safetensors")
            self.files = {n: path for n in self._handle(path).keys()}

    def _handle(self, path: str):
        from safetensors import safe_open

        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._open[path]

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {n: tuple(self._handle(f).get_slice(n).get_shape()) for n, f in self.files.items()}

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.files[name]).get_tensor(name)

    def close(self) -> None:
        self._stack.close()


def hf_model_args(cfg: dict, hf_dir: str) -> dict:
    """The ``model_args.json`` record of the training script's model for a Hugging Face config."""
    check_hf_config(cfg)
    return model_args_from_flags(megatron_flags(cfg, hf_dir))


def read_base(path: str) -> Tuple[dict, Optional[str]]:
    """(model_args, HF dir or None) of ``--base``: a Megatron checkpoint (root or iteration dir),
    a model_args.json, or a Hugging Face model dir / config.json."""
    if os.path.isfile(path):
        record = read_json(path, "")
        if "model_type" in record:
            return hf_model_args(record, os.path.dirname(os.path.abspath(path))), os.path.dirname(path)
        if "num_layers" in record:
            return record, None
        raise ConversionError(f"{path}: neither a model_args.json nor a Hugging Face config.json.")
    if not os.path.isdir(path):
        raise ConversionError(f"--base {path}: no such file or directory.")
    candidates = [os.path.join(path, files.MODEL_ARGS_FILE)]
    iteration = model_checkpoint.latest_iteration(path)
    if iteration is not None:
        candidates.append(os.path.join(atomic_save.iteration_dir(path, iteration), files.MODEL_ARGS_FILE))
    for candidate in candidates:
        if os.path.exists(candidate):
            return read_json(candidate, ""), None
    if iteration is not None or os.path.exists(os.path.join(path, ".metadata")):  # saved by Megatron-LM
        record = model_checkpoint.megatron_lm_model_args(model_checkpoint.resolve(path))
        if record:
            return record, None
    if os.path.exists(os.path.join(path, "config.json")):
        return hf_model_args(read_json(os.path.join(path, "config.json"), ""), os.path.abspath(path)), path
    raise ConversionError(f"--base {path}: no model_args.json, no Megatron-LM args and no config.json; "
                          "pass a checkpoint written by hf-to-megatron / pretrain_gpt_lora.py, its "
                          "model_args.json, or the Hugging Face model directory.")


def base_norms(base: str, arch: Arch) -> Optional[BaseNorms]:
    """The row norms of ``base``'s projections on demand, for the projections a DoRA adapter
    leaves out (``peft_dora``): read from a Hugging Face directory (those tensors only) or a
    Megatron checkpoint (built at TP=1 and loaded, as ``merge`` does); None for a
    ``model_args.json``, which holds no weights (the import then names the projection)."""
    model_args, hf_dir = read_base(base)
    if hf_dir is not None:
        return lambda needed: _hf_norms(hf_dir or ".", needed)
    if os.path.isfile(base):
        return None
    return lambda needed: _megatron_norms(base, model_args, arch, needed)


def _hf_norms(hf_dir: str, needed):
    ckpt = HFCheckpoint(hf_dir)
    try:
        return {(layer, part): row_norms(ckpt.get(f"model.layers.{layer}.{PARENT_OF_PART[part]}.{part}.weight"))
                for layer, part in needed}
    finally:
        ckpt.close()


def _megatron_norms(base: str, model_args: dict, arch: Arch, needed):
    from megatron_lora.hf.session import base_tensors, build_stage, megatron_session

    module_of = {part: (module, parts.index(part)) for module, (_, parts) in MODULES.items() for part in parts}
    with megatron_session():
        model = build_stage(model_args)
        model_checkpoint.load_model(model, base)
        weights, out = base_tensors(model), {}
        for layer, part in needed:
            module, index = module_of[part]
            fused = weights[f"decoder.layers.{layer}.{module}.weight"].detach()
            out[(layer, part)] = row_norms(arch.split(module, fused)[index])
        return out


def read_peft(peft_dir: str, arch: Arch, per_projection: bool = False,
              base: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], LoRAConfig]:
    """A PEFT adapter directory as a full adapter (see ``peft_adapters``), per-projection or not;
    ``base`` (``--base``): where a DoRA adapter's left-out projections find their norms."""
    config = read_json(os.path.join(peft_dir, PEFT_CONFIG), "pass a PEFT adapter directory (save_pretrained)")
    check_peft_config(config, os.path.join(peft_dir, PEFT_CONFIG))
    weights = os.path.join(peft_dir, PEFT_WEIGHTS)
    if not os.path.exists(weights):
        raise ConversionError(f"{peft_dir}: no {PEFT_WEIGHTS} (a .bin adapter would be unpickled; re-save "
                              "it with safe_serialization=True).")
    norms = base_norms(base, arch) if base is not None and config.get("use_dora") else None
    return megatron_from_peft(adapter_checkpoint.read_full_adapter(weights)[0], config, arch, weights, per_projection,
                              norms)


def _is_peft_dir(path: str) -> bool:
    config = os.path.join(path, PEFT_CONFIG)
    return os.path.exists(config) and "peft_type" in read_json(config, "")


def read_adapter(path: str, model_args: dict, iteration: Optional[int] = None,
                 log: Log = silent, base: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], LoRAConfig]:
    """Logical adapter tensors and config from: a full adapter .safetensors; a PEFT directory
    (``base``: its ``--base``, for DoRA, see ``read_peft``); a pretrain_gpt_lora.py --save
    directory (its full adapter file, else the latest dist checkpoint; ``iteration`` picks one);
    or one iter_XXXXXXX directory. Every tensor is checked to be a finite float (an export must
    not write NaN weights and exit 0)."""
    return checked(*_read_adapter(path, model_args, iteration, log, base), where=path)


def checked(tensors: Dict[str, torch.Tensor], cfg: LoRAConfig, where: str):
    """``(tensors, cfg)`` once every tensor is known to be a finite float (else CheckpointError)."""
    for name, tensor in tensors.items():
        adapter_checkpoint.check_finite_float(name, tensor, where)
    return tensors, cfg


def _read_adapter(path: str, model_args: dict, iteration: Optional[int], log: Log, base: Optional[str] = None):
    from megatron_lora.hf.session import build_stage, megatron_session

    if os.path.isfile(path):
        tensors, meta = adapter_checkpoint.read_full_adapter(path)
        if "lora_config" not in meta:
            raise ConversionError(f"{path} has no lora_config metadata: not a megatron_lora full adapter "
                                  "(a PEFT adapter is passed as its directory).")
        return tensors, LoRAConfig.from_dict(json.loads(meta["lora_config"]))
    if not os.path.isdir(path):
        raise ConversionError(f"--adapter {path}: no such file or directory.")
    if _is_peft_dir(path):
        return read_peft(path, arch_from_model_args(model_args), base=base)
    full = os.path.join(path, files.FULL_ADAPTER_FILE)
    if iteration is None and os.path.exists(full):
        return _read_adapter(full, model_args, None, log)
    from megatron_lora.training import megatron_lm

    saved_by_megatron_lm = megatron_lm.megatron_lm_adapter(path, iteration)  # patches/pretrain_gpt_lora.py
    if saved_by_megatron_lm is not None:
        ckpt_dir, cfg = saved_by_megatron_lm
        log(f"reading the Megatron-LM adapter checkpoint {ckpt_dir}")
        with megatron_session():
            model = build_stage(model_args, cfg)
            megatron_lm.load_megatron_lm_adapter(model, ckpt_dir)
            return adapter_checkpoint.gather_full_adapter(model), cfg
    root, name = path, os.path.basename(os.path.normpath(path))
    if name.startswith("iter_") and files.descriptor_path(path) is not None:
        root, iteration = os.path.dirname(os.path.normpath(path)), int(name[len("iter_"):])
    iteration = iteration if iteration is not None else adapter_checkpoint.latest_iteration(root)
    if iteration is None:
        raise ConversionError(f"--adapter {path}: no {files.FULL_ADAPTER_FILE}, no "
                              f"{files.ADAPTER_TRACKER} and no PEFT {PEFT_CONFIG}; pass a full adapter "
                              "file, a LoRA --save directory or a PEFT directory.")
    ckpt_dir = atomic_save.iteration_dir(root, iteration)
    if not os.path.isdir(ckpt_dir):
        saved = sorted(int(n[len("iter_"):]) for n in os.listdir(root) if n.startswith("iter_")
                       and n[len("iter_"):].isdigit() and files.descriptor_path(os.path.join(root, n)))
        raise ConversionError(f"--iteration {iteration}: {root} has no {os.path.basename(ckpt_dir)}; its adapter "
                              f"checkpoints are at iterations {', '.join(map(str, saved)) or '(none)'}.")
    cfg = LoRAConfig.from_dict(files.read_descriptor(ckpt_dir)["lora_config"])
    log(f"reading the adapter dist checkpoint {ckpt_dir}")
    with megatron_session():
        model = build_stage(model_args, cfg)
        adapter_checkpoint.load_adapter(model, root, iteration)
        return adapter_checkpoint.gather_full_adapter(model), cfg
