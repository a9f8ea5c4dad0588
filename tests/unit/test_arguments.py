import argparse

import pytest

from megatron_lora import LoRAConfig
from megatron_lora.training.arguments import add_lora_args, lora_config_from_args


def _parse(argv):
    return add_lora_args(argparse.ArgumentParser()).parse_args(argv)


def test_without_lora_rank_nothing_changes():
    assert lora_config_from_args(_parse([])) is None


def test_every_flag_reaches_the_config():
    args = _parse(["--lora-rank", "16", "--lora-alpha", "32", "--lora-dropout", "0.1",
                   "--lora-target-modules", "linear_qkv", "linear_proj", "--lora-init", "gaussian",
                   "--lora-use-rslora", "--lora-seed", "7", "--lora-load", "a.safetensors",
                   "--lora-save-merged", "merged/"])
    assert lora_config_from_args(args) == LoRAConfig(
        rank=16, alpha=32.0, dropout=0.1, target_modules=("linear_qkv", "linear_proj"),
        init="gaussian", use_rslora=True, seed=7)
    assert (args.lora_load, args.lora_save_merged) == ("a.safetensors", "merged/")


def test_defaults_are_the_config_defaults():
    assert lora_config_from_args(_parse(["--lora-rank", "8"])) == LoRAConfig(rank=8)


def test_help_comes_from_the_config_fields():
    text = add_lora_args(argparse.ArgumentParser()).format_help()
    for fragment in ("--lora-rank", "LoRA rank r", "--lora-use-rslora", "alpha / sqrt(r)", "--lora-load"):
        assert fragment in text


def test_invalid_value_names_the_flag():
    with pytest.raises(ValueError, match="--lora-dropout must satisfy 0 <= dropout < 1"):
        lora_config_from_args(_parse(["--lora-rank", "8", "--lora-dropout", "1.5"]))
    for alpha in ("inf", "nan", "-inf"):
        with pytest.raises(ValueError, match="--lora-alpha must be a finite number > 0"):
            lora_config_from_args(_parse(["--lora-rank", "8", f"--lora-alpha={alpha}"]))
    with pytest.raises(SystemExit):  # argparse refuses an unknown init before the config does
        _parse(["--lora-rank", "8", "--lora-init", "xavier"])


@pytest.mark.parametrize("cfg", [
    LoRAConfig(rank=8),
    LoRAConfig(rank=12, alpha=2.5, dropout=0.1, target_modules=("linear_fc1",), init="gaussian",
               use_rslora=True, seed=7),
    LoRAConfig(rank=4, alpha=3, target_modules=("linear_qkv", "linear_proj")),
])
def test_lora_flags_give_the_config_back(cfg):
    from megatron_lora.training.arguments import lora_flags

    flags = lora_flags(cfg)
    assert all(isinstance(f, str) for f in flags)
    assert lora_config_from_args(_parse(flags)) == cfg
    assert flags[:2] == ["--lora-rank", str(cfg.rank)]
