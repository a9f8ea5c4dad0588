"""Checkpoint conversion: Hugging Face base weights and PEFT adapters in and out, and merging.

    hf_to_megatron(hf_dir, out, tp=2)           HF safetensors -> Megatron dist checkpoint, model_args.json,
                                                model_flags.txt (the pretrain_gpt_lora.py model flags)
    peft_to_megatron(peft_dir, out_file, base)  PEFT adapter -> full adapter (.safetensors) for --lora-load
    megatron_to_peft(adapter, out_dir, base)    full adapter / --save dir / dist checkpoint -> PEFT dir
    merge(base_ckpt, adapter, out, to="hf")     base + adapter folded -> Megatron or HF checkpoint

Megatron models are built once, at TP=1 / PP=1, in this process (a one-rank gloo group; CPU mode
when there is no GPU): dist checkpoints reshard on load, so what is written loads at any TP / PP,
and adapters are logical (TP=1) tensors that ``load_full_adapter`` slices for any TP. Every input
is checked (architecture, divisibility, targets, shapes) before a model is built or a file written;
expected problems raise ``ConversionError`` or ``CheckpointError`` with a one-line message.
Tensor mapping: ``hf_mapping`` (base weights) and ``hf_adapters`` (PEFT adapters). Neither
transformers nor peft is needed to convert; the tests use them as the reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_lora.core.checkpoint import common as io
from megatron_lora.core.config import LoRAConfig
from megatron_lora.hf.peft_adapters import check_peft_config, megatron_from_peft, peft_from_megatron
from megatron_lora.hf.mapping import (
    Arch, ConversionError, arch_from_hf_config, arch_from_model_args, check_hf_config, check_hf_config_matches,
    check_hf_tensors, check_parallel_layout, hf_config_for, hf_from_megatron, megatron_flags, megatron_from_hf,
)

Log = Callable[[str], None]
FLAGS_FILE = "model_flags.txt"
FULL_ADAPTER_FILE = "adapter.safetensors"  # what a pretrain_gpt_lora.py LoRA --save dir ends with
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SCRIPT_REQUIRED = ["--seq-length", "1", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "0"]


def _silent(_: str) -> None:
    pass


# ------------------------------------------------------------------------------- inputs

def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found; {what}.") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err}).") from None


def _read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    from megatron_lora.core.checkpoint.adapter import read_full_adapter  # readable errors for truncated files

    return read_full_adapter(path)


class HFCheckpoint:
    """A Hugging Face model directory: config.json plus safetensors (one file or an index)."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        self.config = _read_json(os.path.join(hf_dir, "config.json"), "pass a Hugging Face model directory")
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            self.files = {n: os.path.join(hf_dir, f) for n, f in _read_json(index, "")["weight_map"].items()}
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


def model_args_from_flags(flags, vocab_size: int) -> dict:
    """The ``model_args.json`` record pretrain_gpt_lora.py derives from these model flags."""
    from megatron_lora.training import pretrain_args as P

    args = P.build_parser().parse_args(list(flags) + _SCRIPT_REQUIRED)
    # validate_args' derived values
    args.num_query_groups = args.num_query_groups or args.num_attention_heads
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    args.padded_vocab_size, args.tokenizer_type = vocab_size, "HuggingFaceTokenizer"
    return P.model_args(args)


def without_flags(flags, names) -> list:
    """``flags`` without the given ``--flag VALUE`` pairs."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        else:
            out.append(flag)
    return out


def read_base(path: str) -> Tuple[dict, Optional[str]]:
    """(model_args, HF dir or None) of ``--base``: a Megatron checkpoint (root or iteration dir),
    a model_args.json, or a Hugging Face model dir / config.json."""
    if os.path.isfile(path):
        record = _read_json(path, "")
        if "model_type" in record:
            return _hf_model_args(record, os.path.dirname(os.path.abspath(path))), os.path.dirname(path)
        if "num_layers" in record:
            return record, None
        raise ConversionError(f"{path}: neither a model_args.json nor a Hugging Face config.json.")
    if not os.path.isdir(path):
        raise ConversionError(f"--base {path}: no such file or directory.")
    candidates = [os.path.join(path, "model_args.json")]
    iteration = io.latest_iteration(path, "latest_checkpointed_iteration.txt")
    if iteration is not None:
        candidates.append(os.path.join(io.iteration_dir(path, iteration), "model_args.json"))
    for candidate in candidates:
        if os.path.exists(candidate):
            return _read_json(candidate, ""), None
    if os.path.exists(os.path.join(path, "config.json")):
        return _hf_model_args(_read_json(os.path.join(path, "config.json"), ""), os.path.abspath(path)), path
    raise ConversionError(f"--base {path}: no model_args.json (a Megatron-LM checkpoint?) and no config.json; "
                          "pass a checkpoint written by hf-to-megatron / pretrain_gpt_lora.py, its "
                          "model_args.json, or the Hugging Face model directory.")


def _hf_model_args(cfg: dict, hf_dir: str) -> dict:
    check_hf_config(cfg)
    return model_args_from_flags(megatron_flags(cfg, hf_dir), cfg["vocab_size"])


def _check_new_output(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConversionError(f"--output {path} already exists; choose a new path or delete it.")


# ------------------------------------------------------------------------- Megatron side

@contextlib.contextmanager
def megatron_session():
    """A one-rank process group with Megatron's parallel state at TP = PP = 1 (reused if set up)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if dist.is_initialized():
        if dist.get_world_size() != 1 or not parallel_state.model_parallel_is_initialized():
            raise ConversionError("conversions run in one process (they build the model at TP=1 / PP=1); "
                                  "call them outside a multi-rank job.")
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    else:
        from megatron_lora.cpu import enable_cpu

        enable_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel()
            model_parallel_cuda_manual_seed(0)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def build_stage(model_args: dict, lora: Optional[LoRAConfig] = None, dtype: str = "float32"):
    """The GPT stage pretrain_gpt_lora.py builds for these model args, at the current TP / PP,
    weights left uninitialised (they are loaded); LoRA applied when ``lora`` is given."""
    from megatron.core import parallel_state

    from megatron_lora import apply_lora
    from megatron_lora.training import pretrain_args as P
    from megatron_lora.core.gpt import build_gpt_stage

    args = P.parse_args(_SCRIPT_REQUIRED)
    for name in P.MODEL_ARG_NAMES:
        if name in model_args:
            setattr(args, name, model_args[name])
    args.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    args.pipeline_model_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
    args.hidden_dropout = args.attention_dropout = 0.0
    args.bf16, args.use_cpu = dtype == "bfloat16", not torch.cuda.is_available()
    args.gradient_accumulation_fusion = False  # one forward, no training
    config = P.transformer_config_from_args(args)
    config.perform_initialization = False
    model = build_gpt_stage(config, args.padded_vocab_size, args.max_position_embeddings, lora_config=lora,
                            position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    return apply_lora(model, lora) if lora is not None else model


def _base_tensors(model) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor) and not k.endswith((".lora_A", ".lora_B", "_extra_state"))}


# ------------------------------------------------------------------------- hf-to-megatron

def hf_to_megatron(hf_dir: str, output: str, tp: int = 1, pp: int = 1, dtype: str = "float32",
                   log: Log = _silent) -> dict:
    """Convert a Hugging Face Llama / Qwen2 checkpoint; returns {"model_args", "flags"}."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}.")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf-dir {hf_dir}: no such directory.")
    ckpt = HFCheckpoint(hf_dir)
    try:
        where = os.path.join(hf_dir, "config.json")
        check_hf_config(ckpt.config, where)
        arch = arch_from_hf_config(ckpt.config)
        check_parallel_layout(arch, tp, pp)
        check_hf_tensors(ckpt.shapes(), arch, hf_dir)
        flags = megatron_flags(ckpt.config, os.path.abspath(hf_dir))
        model_args = model_args_from_flags(flags, arch.vocab_size)
        _check_new_output(output)
        log(f"{ckpt.config['model_type']}: {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_heads} "
            f"heads / {arch.num_groups} query groups, vocab {arch.vocab_size}; building the Megatron model")
        from megatron_lora.core.checkpoint.model import save_model

        with megatron_session():
            model = build_stage(model_args, dtype=dtype)
            params, done = _base_tensors(model), set()
            with torch.no_grad():
                for name, tensor in megatron_from_hf(ckpt.get, arch):
                    if tuple(params[name].shape) != tuple(tensor.shape):  # a mapping bug, not user input
                        raise RuntimeError(f"{name}: model {tuple(params[name].shape)}, "
                                           f"converted {tuple(tensor.shape)}")
                    params[name].copy_(tensor)
                    done.add(name)
                    if name.endswith("linear_fc2.weight"):
                        log(f"  layer {int(name.split('.')[2]) + 1}/{arch.num_layers} converted")
            if set(params) != done:
                raise RuntimeError(f"not converted: {sorted(set(params) - done)}")
            log(f"saving the Megatron checkpoint to {output}")
            save_model(model, output, 0, model_args)
    finally:
        ckpt.close()
    io.atomic_write_text(os.path.join(output, FLAGS_FILE), shlex.join(flags) + "\n")
    log(f"done; it loads at TP={tp} PP={pp} (or any layout that divides the sizes). Model flags for "
        f"pretrain_gpt_lora.py (also in {os.path.join(output, FLAGS_FILE)}):\n  {shlex.join(flags)}")
    return dict(model_args=model_args, flags=flags)


# ---------------------------------------------------------------------------- adapters

def _write_full_adapter(tensors: Dict[str, torch.Tensor], cfg: LoRAConfig, path: str, source: str) -> None:
    from safetensors.torch import save_file

    from megatron_lora.core.checkpoint.adapter import FORMAT, FORMAT_VERSION

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=dict(format=FORMAT, format_version=str(FORMAT_VERSION),
                                          lora_config=json.dumps(cfg.to_dict()), converted_from=source))
    os.replace(tmp, path)


def lora_flags(cfg: LoRAConfig, path: str) -> list:
    """The pretrain_gpt_lora.py flags that load this full adapter (its config must match)."""
    alpha = float(cfg.alpha)
    flags = ["--lora-load", path, "--lora-rank", cfg.rank,
             "--lora-alpha", int(alpha) if alpha.is_integer() else repr(alpha),
             "--lora-target-modules", *cfg.target_modules]
    flags += ["--lora-dropout", cfg.dropout] if cfg.dropout else []
    return [str(f) for f in flags + (["--lora-use-rslora"] if cfg.use_rslora else [])]


def read_peft(peft_dir: str, arch: Arch) -> Tuple[Dict[str, torch.Tensor], LoRAConfig]:
    """A PEFT adapter directory as a full adapter (see ``hf_adapters``)."""
    config = _read_json(os.path.join(peft_dir, PEFT_CONFIG), "pass a PEFT adapter directory (save_pretrained)")
    check_peft_config(config, os.path.join(peft_dir, PEFT_CONFIG))
    weights = os.path.join(peft_dir, PEFT_WEIGHTS)
    if not os.path.exists(weights):
        raise ConversionError(f"{peft_dir}: no {PEFT_WEIGHTS} (a .bin adapter would be unpickled; re-save "
                              "it with safe_serialization=True).")
    return megatron_from_peft(_read_safetensors(weights)[0], config, arch, weights)


def peft_to_megatron(peft_dir: str, output: str, base: str, log: Log = _silent) -> LoRAConfig:
    """Import a PEFT adapter as a full adapter file; returns its LoRAConfig."""
    model_args, _ = read_base(base)
    if os.path.exists(output):
        raise ConversionError(f"--output {output} already exists; choose a new path or delete it.")
    tensors, cfg = read_peft(peft_dir, arch_from_model_args(model_args, base))
    _write_full_adapter(tensors, cfg, output, f"peft:{os.path.abspath(peft_dir)}")
    log(f"wrote {output}: rank {cfg.rank}, alpha {cfg.alpha:g} on {' '.join(cfg.target_modules)}. "
        f"LoRA flags for pretrain_gpt_lora.py:\n  {shlex.join(lora_flags(cfg, output))}")
    return cfg


def read_adapter(path: str, model_args: dict, iteration: Optional[int] = None,
                 log: Log = _silent) -> Tuple[Dict[str, torch.Tensor], LoRAConfig]:
    """Logical adapter tensors and config from: a full adapter .safetensors; a PEFT directory; a
    pretrain_gpt_lora.py --save directory (its adapter.safetensors, else the latest dist
    checkpoint; ``iteration`` picks one); or one iter_XXXXXXX directory."""
    from megatron_lora.core.checkpoint import adapter as C

    if os.path.isfile(path):
        tensors, meta = _read_safetensors(path)
        if "lora_config" not in meta:
            raise ConversionError(f"{path} has no lora_config metadata: not a megatron_lora full adapter "
                                  "(a PEFT adapter is passed as its directory).")
        return tensors, LoRAConfig.from_dict(json.loads(meta["lora_config"]))
    if not os.path.isdir(path):
        raise ConversionError(f"--adapter {path}: no such file or directory.")
    config = os.path.join(path, PEFT_CONFIG)
    if os.path.exists(config) and "peft_type" in _read_json(config, ""):
        return read_peft(path, arch_from_model_args(model_args))
    if iteration is None and os.path.exists(os.path.join(path, FULL_ADAPTER_FILE)):
        return read_adapter(os.path.join(path, FULL_ADAPTER_FILE), model_args)
    root = path
    if os.path.exists(config) and os.path.basename(os.path.normpath(path)).startswith("iter_"):
        root, iteration = os.path.dirname(os.path.normpath(path)), int(os.path.basename(os.path.normpath(path))[5:])
    iteration = iteration if iteration is not None else C.latest_iteration(root)
    if iteration is None:
        raise ConversionError(f"--adapter {path}: no {FULL_ADAPTER_FILE}, no {C.LATEST_FILE} and no PEFT "
                              f"{PEFT_CONFIG}; pass a full adapter file, a LoRA --save directory or a PEFT directory.")
    cfg = LoRAConfig.from_dict(C.read_descriptor(io.iteration_dir(root, iteration))["lora_config"])
    log(f"reading the adapter dist checkpoint {io.iteration_dir(root, iteration)}")
    with megatron_session():
        model = build_stage(model_args, cfg)
        C.load_adapter(model, root, iteration)
        return C.gather_full_adapter(model), cfg


def megatron_to_peft(adapter: str, output: str, base: str, iteration: Optional[int] = None, compact: bool = True,
                     base_model_name_or_path: Optional[str] = None, log: Log = _silent) -> dict:
    """Export an adapter for transformers + peft; returns the adapter_config written."""
    from safetensors.torch import save_file

    model_args, hf_dir = read_base(base)
    arch = arch_from_model_args(model_args, base)
    _check_new_output(output)
    tensors, cfg = read_adapter(adapter, model_args, iteration, log)
    peft_tensors, config = peft_from_megatron(tensors, cfg, arch, compact, base_model_name_or_path or hf_dir, adapter)
    os.makedirs(output, exist_ok=True)
    save_file(peft_tensors, os.path.join(output, PEFT_WEIGHTS), metadata={"format": "pt"})
    io.atomic_write_text(os.path.join(output, PEFT_CONFIG), json.dumps(config, indent=2))
    log(f"wrote the PEFT adapter {output}: r={config['r']}, lora_alpha={config['lora_alpha']} on "
        f"{', '.join(config['target_modules'])}")
    return config


# ------------------------------------------------------------------------------- merge

def merge(base: str, adapter: Optional[str], output: str, to: str = "megatron", hf_config_dir: Optional[str] = None,
          dtype: str = "float32", iteration: Optional[int] = None, log: Log = _silent) -> None:
    """Fold ``adapter`` into the Megatron checkpoint ``base`` (no adapter: just convert the base)
    and write a Megatron checkpoint (``to="megatron"``) or a Hugging Face one (``to="hf"``)."""
    if to not in ("megatron", "hf"):
        raise ConversionError(f"--to {to!r}: choose 'megatron' or 'hf'.")
    model_args, hf_dir = read_base(base)
    if hf_dir is not None:
        raise ConversionError(f"--base {base} is a Hugging Face model; convert it with hf-to-megatron first.")
    arch = arch_from_model_args(model_args, base) if to == "hf" else None
    if hf_config_dir is not None and to != "hf":
        raise ConversionError("--hf-config-dir is for --to hf; a Megatron output keeps the base's model_args.json.")
    if hf_config_dir is not None:
        check_hf_config_matches(_read_json(os.path.join(hf_config_dir, "config.json"), "pass the HF model dir"),
                                arch, os.path.join(hf_config_dir, "config.json"))
    _check_new_output(output)
    tensors, cfg = read_adapter(adapter, model_args, iteration, log) if adapter else (None, None)
    from megatron_lora import merge_lora
    from megatron_lora.core.checkpoint.adapter import load_full_adapter
    from megatron_lora.core.checkpoint.model import load_model, save_model

    with megatron_session():
        model = build_stage(model_args, cfg)
        log(f"loading the base {base}")
        load_model(model, base)
        if cfg is not None:
            load_full_adapter(model, tensors)
            merge_lora(model)
            log(f"merged the adapter (rank {cfg.rank}, {' '.join(cfg.target_modules)})")
        if to == "megatron":
            from megatron_lora.training.pretrain_args import MODEL_ARG_NAMES

            record = {k: model_args[k] for k in MODEL_ARG_NAMES if k in model_args}
            save_model(model.to(DTYPES[dtype]), output, 0, record)
            flags = os.path.join(base, FLAGS_FILE)
            if os.path.exists(flags):
                shutil.copy(flags, os.path.join(output, FLAGS_FILE))
        else:
            state = {k: v.detach() for k, v in _base_tensors(model).items()}
            write_hf(hf_from_megatron(state, arch), arch, model_args, output, hf_config_dir, dtype, log)
    log(f"wrote {'a Megatron' if to == 'megatron' else 'a Hugging Face'} checkpoint to {output}")


def write_hf(tensors: Dict[str, torch.Tensor], arch: Arch, model_args: dict, output: str,
             hf_config_dir: Optional[str], dtype: str, log: Log = _silent, shard_bytes: int = 5 * 2 ** 30) -> None:
    """config.json + safetensors (sharded with an index above ``shard_bytes``) that
    ``AutoModelForCausalLM.from_pretrained`` loads; the original config and tokenizer files
    of ``hf_config_dir`` are kept when given."""
    from safetensors.torch import save_file

    os.makedirs(output, exist_ok=True)
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        tensor = tensor.to(DTYPES[dtype]).contiguous().cpu()
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = tensor, size + tensor.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, (file, shard) in enumerate(zip(names, shards)):
        save_file(shard, os.path.join(output, file), metadata={"format": "pt"})
        log(f"  wrote {file} ({i + 1}/{len(shards)})")
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())},
                 "weight_map": {n: f for f, s in zip(names, shards) for n in s}}
        io.atomic_write_text(os.path.join(output, "model.safetensors.index.json"), json.dumps(index, indent=2))
    if hf_config_dir is None:
        config = hf_config_for(arch, model_args, dtype)
    else:
        config = _read_json(os.path.join(hf_config_dir, "config.json"), "")
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
        for file in sorted(os.listdir(hf_config_dir)):  # tokenizer, generation config, chat template
            src = os.path.join(hf_config_dir, file)
            if os.path.isfile(src) and file != "config.json" and not file.endswith(
                    (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")):
                shutil.copy(src, os.path.join(output, file))
    io.atomic_write_text(os.path.join(output, "config.json"), json.dumps(config, indent=2))
