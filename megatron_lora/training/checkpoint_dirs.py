"""What ``--save`` and ``--load`` may point at, checked before any rank starts or writes.

A LoRA run (``--lora-rank``) writes and resumes adapter checkpoints, any other run full-model
checkpoints. A save must never replace a checkpoint of the other kind, of another LoRA config or
of another model, and a ``--load`` that holds nothing this run can resume is a mistake (a typo,
a forgotten ``--lora-rank``), not a fresh start. The one fresh start is the resume-or-start
pattern of a first launch: ``--load`` naming the same directory as ``--save``, before anything
was saved there.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Optional

from megatron_lora.core.checkpoint import atomic_save, files
from megatron_lora.core.checkpoint.errors import CheckpointError

_WHAT = {"adapter": "LoRA adapter checkpoints", "model": "full-model checkpoints",
         "both": "both adapter and full-model checkpoints"}


def check_checkpoint_dirs(args, model_args: dict, fail: Callable[[str], None]) -> None:
    """Refuse a ``--save`` / ``--load`` that would lose data or resume the wrong thing."""
    kind = "adapter" if args.lora is not None else "model"
    if args.save:
        _check_writable(args.save, fail)
        found = files.checkpoint_kind(args.save)
        if found not in (None, kind):
            fail(f"--save {args.save} holds {_WHAT[found]}; this run writes {_WHAT[kind]} and would "
                 f"replace them. Choose another --save{_hint(kind)}.")
        if found == kind and os.path.abspath(args.save) != os.path.abspath(args.load or ""):
            _check_same_run(args.save, kind, args, model_args, "--save", fail)  # else: --load's check
    if args.load:
        if not os.path.exists(args.load):
            if os.path.abspath(args.load) != os.path.abspath(args.save or ""):
                fail(f"--load {args.load}: no such directory. Pass a --save directory of an earlier run "
                     "(a first launch that resumes where it saves passes the same directory to both).")
            return
        found = files.checkpoint_kind(args.load)
        if found is None and os.path.abspath(args.load) != os.path.abspath(args.save or ""):
            fail(f"--load {args.load} holds no checkpoint ({files.ADAPTER_TRACKER} or "
                 f"{files.MODEL_TRACKER}); pass the --save directory of the run to resume.")
        if found not in (None, kind):
            fail(f"--load {args.load} holds {_WHAT[found]}; this run resumes {_WHAT[kind]}{_hint(kind)}.")
        if found == kind:
            _check_same_run(args.load, kind, args, model_args, "--load", fail)


def describe_mismatch(saved: dict, current: dict) -> Optional[str]:
    """``--flag saved vs current`` for each differing architecture flag, or None (the loop and
    the converters call it too, for the architecture a checkpoint records)."""
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, this run {current[k]!r}"
             for k in current if k in saved and saved[k] != current[k]]
    return "; ".join(diffs) or None


def _hint(kind: str) -> str:
    if kind == "model":
        return " (resuming a LoRA run? give it the same --lora-* flags)"
    return " (a LoRA run's --save holds only its adapter: not the base's directory)"


def _check_same_run(root: str, kind: str, args, model_args: dict, flag: str, fail) -> None:
    """The checkpoints under ``root`` are of this LoRA config / this architecture."""
    tracker = files.ADAPTER_TRACKER if kind == "adapter" else files.MODEL_TRACKER
    try:
        latest = atomic_save.latest_iteration(root, tracker)
    except CheckpointError as err:
        fail(str(err))
    if latest is None:
        return
    ckpt_dir = atomic_save.iteration_dir(root, latest)
    if kind == "adapter":
        try:
            descriptor = files.read_descriptor(ckpt_dir)
        except CheckpointError as err:
            fail(str(err))
        saved, current = descriptor["lora_config"], args.lora.to_dict()
        fields = files.CONFIG_FIELDS_THAT_MUST_MATCH
        differ = describe_mismatch({f"lora_{k}": files.saved_config_value(saved, k) for k in fields},
                                   {f"lora_{k}": current[k] for k in fields})
        what = "another LoRA config"
        if not differ:  # the model it adapts (adapters saved before this was recorded: unchecked)
            differ = describe_mismatch(descriptor.get("model_args", {}), model_args)
            what = "an adapter of another model"
    else:
        path = os.path.join(ckpt_dir, files.MODEL_ARGS_FILE)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            differ = describe_mismatch(json.load(f), model_args)
        what = "another model"
    if differ and flag == "--load":
        fail(f"--load {root} holds checkpoints of {what} ({differ}); resume with the checkpoint's "
             "flags (the parallel layout, EP and ETP included, may differ), or drop --load to start afresh.")
    if differ:
        fail(f"{flag} {root} holds checkpoints of {what} ({differ}); saving there would mix "
             "them. Use the checkpoint's flags to resume it, or choose another --save.")


def _check_writable(path: str, fail) -> None:
    """``--save`` names a directory this process can create files in (found now, not after training)."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"--save {path} is a file, not a directory; pass a directory for the checkpoints.")
    parent = os.path.abspath(path)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        fail(f"--save {path}: cannot write checkpoints under {parent} ({err.strerror or err}); pass a "
             "writable directory.")
