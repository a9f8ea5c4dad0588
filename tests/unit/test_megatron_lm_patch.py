"""``patches/pretrain_gpt_lora.py`` against a fake Megatron-LM checkout (Megatron-LM is not installed).

The fake is the part of Megatron-LM the wrapper relies on, written for this test:
- ``pretrain_gpt.py`` whose ``__main__`` calls ``pretrain`` the way core_r0.13.0 does (the fork's
  own ``model_provider``, positional) or core_r0.16.x does (``partial(model_provider, gpt_builder)``
  from a sibling module, ``get_embedding_ranks``, an extra-args provider of the fork's own);
- ``megatron.training`` with ``pretrain`` (the real signature), ``get_args`` and
  ``inprocess_restart``. Its ``pretrain`` follows Megatron-LM's order: parse the flags (with
  ``extra_args_provider``), build through the model provider, ``load_checkpoint`` (``--load``, or
  ``--pretrained-checkpoint`` as a fine-tuning start when ``--load`` holds none), train, and
  ``save_checkpoint`` (the model's ``sharded_state_dict`` through ``dist_checkpointing``).

The model is a real tiny Megatron-Core GPT in this process (one gloo rank, CPU mode).
"""

import argparse
import hashlib
import importlib.util
import os
import socket
import sys
import types

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_lora import LoRAColumnParallelLinear, LoRARowParallelLinear, lora_modules
from megatron_lora.core.checkpoint.adapter import save_full_adapter
from megatron_lora.core.layers import is_lora_key
from megatron_lora.training.megatron_lm import lora_pretrain
from megatron_lora.cpu import enable_cpu
from tests import REPO_ROOT
from tests.distributed.models import build_tiny_gpt, tiny_gpt_config

_SPEC = importlib.util.spec_from_file_location(
    "pretrain_gpt_lora", os.path.join(REPO_ROOT, "patches", "pretrain_gpt_lora.py"))
wrapper = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(wrapper)

# Two releases' __main__ blocks (the lines that matter), around one shared body.
FORK_BODY = '''
from functools import partial
from typing import Optional
from megatron.core.enums import ModelType
from megatron.training import get_args, inprocess_restart, pretrain


def forward_step(data_iterator, model):
    raise AssertionError("not called by the fake pretrain")


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    raise AssertionError("not called by the fake pretrain")
'''
FORK_MAIN = {
    "core_r0.13": '''
def model_provider(pre_process=True, post_process=True, vp_stage: Optional[int] = None):
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config
    return build_tiny_gpt(tiny_gpt_config(), pre_process=pre_process, post_process=post_process)


if __name__ == "__main__":
    train_valid_test_datasets_provider.is_distributed = True
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={'tokenizer_type': 'GPT2BPETokenizer'},
        extra_args_provider=None,
        store=store,
    )
''',
    "core_r0.16": '''
from gpt_builders import gpt_builder


def model_provider(model_builder, pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    return model_builder(get_args(), pre_process, post_process, vp_stage, config=config,
                         pg_collection=pg_collection)


def add_fork_args(parser):
    parser.add_argument("--fork-flag", type=int, default=0)
    return parser


def get_embedding_ranks(pp_ranks):
    return [pp_ranks[0]]


if __name__ == "__main__":
    train_valid_test_datasets_provider.is_distributed = True
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    pretrain(
        train_valid_test_datasets_provider,
        partial(model_provider, gpt_builder),
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={'tokenizer_type': 'GPT2BPETokenizer'},
        extra_args_provider=add_fork_args,
        store=store,
        get_embedding_ranks=get_embedding_ranks,
    )
''',
}
GPT_BUILDERS = '''
def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config
    return build_tiny_gpt(tiny_gpt_config(), pre_process=pre_process, post_process=post_process)
'''


# ------------------------------------------------------------------------ the fake megatron.training

def _tracker(root):
    return os.path.join(root, "latest_checkpointed_iteration.txt")


def _save(state, root, iteration):
    """Megatron-LM's torch_dist layout: root/iter_XXXXXXX/ plus the tracker file."""
    ckpt_dir = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(ckpt_dir)
    dist_checkpointing.save(state, ckpt_dir)
    with open(_tracker(root), "w") as f:
        f.write(str(iteration))
    return ckpt_dir


def _fake_training_module(record):
    training = types.ModuleType("megatron.training")
    training.args = None

    def get_args():
        return training.args

    def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
                 process_non_loss_data_func=None, extra_args_provider=None, args_defaults={},
                 get_embedding_ranks=None, get_position_embedding_ranks=None, non_loss_data_func=None,
                 store=None, inprocess_call_wrapper=None):
        parser = argparse.ArgumentParser(allow_abbrev=False)
        for flag in ("--pretrained-checkpoint", "--load", "--save", "--ckpt-format"):
            parser.add_argument(flag, default="torch_dist" if flag == "--ckpt-format" else None)
        parser.add_argument("--finetune", action="store_true")
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        args = training.args = parser.parse_args(sys.argv[1:])
        model = model_provider(pre_process=True, post_process=True)
        record.update(args=args, model=model, dataset_provider=train_valid_test_dataset_provider,
                      forward_step=forward_step_func, get_embedding_ranks=get_embedding_ranks)
        # checkpointing.load_checkpoint, torch_dist: the fall-back to --pretrained-checkpoint included.
        load_dir, iteration = args.load, 0
        if args.pretrained_checkpoint is not None and not os.path.exists(_tracker(str(load_dir))):
            load_dir, args.finetune = args.pretrained_checkpoint, True
        if load_dir is not None and os.path.exists(_tracker(load_dir)):
            iteration = int(open(_tracker(load_dir)).read())
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                             os.path.join(load_dir, f"iter_{iteration:07d}"))
            try:  # Megatron-LM retries non-strictly (for Transformer Engine's _extra_state); record it
                model.load_state_dict(loaded["model"], strict=True)
            except RuntimeError:
                record["strict_load_failed"] = True
                model.load_state_dict(loaded["model"], strict=False)
        record["after_load"] = _tensors(model)
        with torch.no_grad():  # "training" changes the trainable parameters only
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.25)
        if args.save is not None:  # Megatron-LM's common.pt holds its args (an argparse.Namespace)
            record["saved"] = _save({"model": model.sharded_state_dict(), "args": args}, args.save, iteration + 1)

    training.get_args = get_args
    training.pretrain = pretrain
    training.inprocess_restart = types.SimpleNamespace(
        maybe_wrap_for_inprocess_restart=lambda pretrain: (pretrain, None))
    return training


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module", autouse=True)
def one_gloo_rank():
    """Megatron-Core on CPU in this process: one gloo rank, TP = PP = 1; torn down afterwards."""
    enable_cpu()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture
def megatron_lm(tmp_path, monkeypatch):
    """``run(release, *flags)``: the wrapper on a fake checkout; returns what the fake pretrain saw."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.delitem(sys.modules, "gpt_builders", raising=False)
    import megatron

    def run(release, *flags):
        root = tmp_path / release
        if not root.exists():
            root.mkdir()
            (root / "pretrain_gpt.py").write_text(FORK_BODY + FORK_MAIN[release])
            (root / "gpt_builders.py").write_text(GPT_BUILDERS)
        record = {}
        training = _fake_training_module(record)
        monkeypatch.setitem(sys.modules, "megatron.training", training)
        monkeypatch.setattr(megatron, "training", training, raising=False)
        monkeypatch.setattr(sys, "argv", ["pretrain_gpt_lora.py", *map(str, flags)])
        before = _tree(root)
        wrapper.main(str(root))
        assert _tree(root) == before, "the wrapper must not write into the Megatron-LM checkout"
        return record

    return run


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A base GPT saved the way Megatron-LM saves one: its sharded state dict, pickled RNG state and
    the run's ``args`` (an ``argparse.Namespace``, in ``common.pt``)."""
    root = str(tmp_path_factory.mktemp("base"))
    model = build_tiny_gpt(tiny_gpt_config())
    rng = ShardedObject("rng_state", {"random_rng_state": 7}, (1,), (0,), replica_id=0)
    args = argparse.Namespace(save=root, params_dtype=torch.float32, tensor_model_parallel_size=1)
    _save({"model": model.sharded_state_dict(), "rng_state": rng, "args": args}, root, 5)
    return root, _tensors(model)


def _tensors(model):
    """A copy of the model's state dict without the non-tensor ``_extra_state`` entries."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _lora(state):
    return {k: v for k, v in state.items() if is_lora_key(k)}


def _base(state):
    return {k: v for k, v in state.items() if not is_lora_key(k)}


# --------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("release", ["core_r0.13", "core_r0.16"])
def test_forks_own_main_runs_with_the_lora_flags_added(megatron_lm, release):
    fork_flags = ["--fork-flag", "3"] if release == "core_r0.16" else []
    seen = megatron_lm(release, "--lora-rank", "4", *fork_flags)
    assert seen["args"].lora_rank == 4
    for fork_function in (seen["forward_step"], seen["dataset_provider"]):  # handed on as they are
        assert fork_function.__code__.co_filename.endswith(os.path.join(release, "pretrain_gpt.py"))
    assert seen["dataset_provider"].is_distributed is True  # set by the fork's own __main__
    if release == "core_r0.16":
        assert seen["args"].fork_flag == 3, "the fork's own extra_args_provider must still run"
        assert seen["get_embedding_ranks"]([4, 5]) == [4]
    assert any(isinstance(m, LoRAColumnParallelLinear) for m in seen["model"].modules())


def test_without_lora_rank_the_model_is_the_forks_untouched(megatron_lm, base_checkpoint):
    base_root, base = base_checkpoint
    seen = megatron_lm("core_r0.16", "--pretrained-checkpoint", base_root)
    model = seen["model"]
    assert not list(lora_modules(model))
    assert all(p.requires_grad for p in model.parameters())
    assert seen["args"].pretrained_checkpoint == base_root, "Megatron-LM's own fine-tuning start stays"
    assert "sharded_state_dict" not in vars(model) and "load_state_dict" not in vars(model)
    for name, value in seen["after_load"].items():  # loaded by the fake's own load_checkpoint
        torch.testing.assert_close(value, base[name], rtol=0, atol=0, msg=name)


def test_lora_rank_loads_the_base_applies_lora_and_freezes_it(megatron_lm, base_checkpoint):
    base_root, base = base_checkpoint
    seen = megatron_lm("core_r0.16", "--lora-rank", "4", "--pretrained-checkpoint", base_root)
    model, args = seen["model"], seen["args"]
    kinds = {type(m).__name__ for m in lora_modules(model)}
    assert kinds == {LoRAColumnParallelLinear.__name__, LoRARowParallelLinear.__name__}
    assert len(list(lora_modules(model))) == 4 * 2  # four targets, two layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(_lora(dict(model.named_parameters())))
    after_load = seen["after_load"]
    assert set(_base(after_load)) == set(base)
    for name, value in _base(after_load).items():
        torch.testing.assert_close(value, base[name], rtol=0, atol=0, msg=name)
    assert (args.pretrained_checkpoint, args.lora_base_checkpoint) == (None, base_root)


def test_checkpoints_hold_only_the_adapter_and_a_resume_restores_it(megatron_lm, base_checkpoint, tmp_path):
    base_root, base = base_checkpoint
    adapter_dir = str(tmp_path / "lora")
    flags = ("--lora-rank", "4", "--pretrained-checkpoint", base_root,
             "--load", adapter_dir, "--save", adapter_dir)
    first = megatron_lm("core_r0.16", *flags)
    saved_keys = set(dist_checkpointing.load_tensors_metadata(first["saved"]))
    assert saved_keys and all(is_lora_key(k) for k in saved_keys), saved_keys
    trained = _lora(_tensors(first["model"]))

    second = megatron_lm("core_r0.16", *flags)  # --load now holds the adapter: a resume
    after_load = second["after_load"]
    assert set(_lora(after_load)) == set(trained)
    for name, value in _lora(after_load).items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    for name, value in _base(after_load).items():  # the base still comes from --pretrained-checkpoint
        torch.testing.assert_close(value, base[name], rtol=0, atol=0, msg=name)
    assert second["saved"].endswith("iter_0000002")
    assert "strict_load_failed" not in second, "Megatron-LM's strict load_state_dict must accept the adapter"


def test_resume_refuses_an_adapter_of_another_model(megatron_lm):
    model = megatron_lm("core_r0.16", "--lora-rank", "4", "--lora-target-modules", "linear_qkv")["model"]
    state = _lora(_tensors(model))
    state["decoder.layers.0.mlp.linear_fc1.lora_A"] = torch.zeros(4, 32)
    with pytest.raises(RuntimeError, match="unexpected \\['decoder.layers.0.mlp.linear_fc1.lora_A'\\]"):
        model.load_state_dict(state, strict=True)


def test_lora_load_starts_from_a_full_adapter(megatron_lm, base_checkpoint, tmp_path):
    base_root, _ = base_checkpoint
    first = megatron_lm("core_r0.16", "--lora-rank", "4", "--pretrained-checkpoint", base_root)
    path = str(tmp_path / "adapter.safetensors")
    save_full_adapter(first["model"], path)  # trained: B != 0
    expected = _lora(_tensors(first["model"]))

    second = megatron_lm("core_r0.16", "--lora-rank", "4", "--pretrained-checkpoint", base_root,
                         "--lora-load", path)
    for name, value in _lora(second["after_load"]).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("flags, message", [
    (("--ckpt-format", "torch"), "--ckpt-format torch: adapter-only checkpoints need torch_dist"),
    (("--lora-save-merged", "merged"), "--lora-save-merged is not supported with --lora-rank"),
    (("--lora-plus-ratio", "16"), "--lora-plus-ratio is not supported with --lora-rank: Megatron-LM builds"),
])
def test_unsupported_flags_are_refused_by_name(megatron_lm, flags, message):
    with pytest.raises(ValueError, match=message):
        megatron_lm("core_r0.13", "--lora-rank", "4", *flags)


def test_a_pretrain_without_extra_args_provider_is_refused():
    def pretrain(cfg_container, train_valid_test_dataset_provider, model_provider, model_type,
                 forward_step_func, store=None):  # core_r0.18's shape
        raise AssertionError("not reached")

    with pytest.raises(SystemExit, match="core_r0.18 and later"):
        lora_pretrain(pretrain)
