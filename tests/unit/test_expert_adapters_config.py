"""``LoRAConfig.expert_adapters``: validated, a generated --lora-* flag, a checkpoint field that
older descriptors lack (read as per_expert)."""

import argparse

import pytest

from megatron_lora import LoRAConfig
from megatron_lora.core.checkpoint.files import CONFIG_FIELDS_THAT_MUST_MATCH, saved_config_value
from megatron_lora.training.arguments import add_lora_args, lora_config_from_args, lora_flags


def test_default_is_per_expert_and_bad_values_are_refused():
    assert LoRAConfig().expert_adapters == "per_expert"
    assert LoRAConfig(expert_adapters="shared").expert_adapters == "shared"
    with pytest.raises(ValueError, match="expert_adapters must be one of"):
        LoRAConfig(expert_adapters="one")


def test_flag_is_generated_and_round_trips():
    parser = add_lora_args(argparse.ArgumentParser())
    cfg = lora_config_from_args(parser.parse_args(["--lora-rank", "4", "--lora-expert-adapters", "shared"]))
    assert cfg.expert_adapters == "shared"
    assert "--lora-expert-adapters" in lora_flags(cfg)
    assert lora_config_from_args(parser.parse_args([str(f) for f in lora_flags(cfg)])) == cfg
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-rank", "4", "--lora-expert-adapters", "one"])


def test_checkpoints_record_it_and_older_ones_read_as_per_expert():
    assert "expert_adapters" in CONFIG_FIELDS_THAT_MUST_MATCH
    older = {k: v for k, v in LoRAConfig().to_dict().items() if k != "expert_adapters"}
    assert saved_config_value(older, "expert_adapters") == "per_expert"
    assert LoRAConfig.from_dict(LoRAConfig(expert_adapters="shared").to_dict()).expert_adapters == "shared"
