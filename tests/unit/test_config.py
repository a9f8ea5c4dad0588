import math

import pytest

from megatron_lora import LoRAConfig


def test_scaling_is_alpha_over_rank_and_rslora_uses_sqrt():
    assert LoRAConfig(rank=8, alpha=16).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=-2), "rank must be a positive integer"),
    (dict(rank=2.5), "rank must be a positive integer"),
    (dict(alpha=0), "alpha must be a finite number > 0"),
    (dict(alpha=float("inf")), "alpha must be a finite number > 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
    (dict(dropout=1.0), "0 <= dropout < 1"),
    (dict(dropout=-0.1), "0 <= dropout < 1"),
    (dict(init="xavier"), "init must be one of"),
    (dict(target_modules=()), "non-empty list"),
])
def test_invalid_values_fail_at_construction(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LoRAConfig(**kwargs)


def test_targets_are_normalised_to_a_tuple_and_round_trip_through_dict():
    cfg = LoRAConfig(target_modules=["linear_qkv"], rank=4)
    assert cfg.target_modules == ("linear_qkv",)
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown LoRAConfig fields"):
        LoRAConfig.from_dict({**cfg.to_dict(), "r": 4})


def test_unknown_target_lists_the_parallel_linears_that_exist():
    cfg = LoRAConfig(target_modules=("linear_qkv", "q_proj"))
    with pytest.raises(ValueError) as err:
        cfg.check_targets_exist(["linear_qkv", "linear_proj", "linear_fc1"])
    message = str(err.value)
    assert "['q_proj']" in message and "linear_fc1" in message and "--lora-target-modules" in message


def test_target_names_give_the_leaf_and_its_holder():
    from megatron_lora.core.config import target_names

    assert target_names("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1") == ("linear_fc1", "experts.linear_fc1")
    assert target_names("decoder.layers.0.mlp.shared_experts.linear_fc2") == ("linear_fc2", "shared_experts.linear_fc2")
    assert target_names("decoder.layers.0.mlp.linear_fc1") == ("linear_fc1", "mlp.linear_fc1")
    assert target_names("decoder.layers.0.mlp.router") == ("router", "mlp.router")
    assert target_names("linear_qkv") == ("linear_qkv",)


def test_a_scoped_target_picks_one_kind_of_linear():
    from megatron_lora import LoRAConfig

    experts_only = LoRAConfig(target_modules=("experts.linear_fc1", "experts.linear_fc2"))
    assert experts_only.targets("decoder.layers.1.mlp.experts.local_experts.2.linear_fc1")
    assert not experts_only.targets("decoder.layers.1.mlp.linear_fc1")
    assert not experts_only.targets("decoder.layers.1.mlp.shared_experts.linear_fc1")
    every_fc1 = LoRAConfig(target_modules=("linear_fc1",))
    assert every_fc1.targets("decoder.layers.1.mlp.shared_experts.linear_fc1")
    assert every_fc1.targets("decoder.layers.1.mlp.experts.local_experts.0.linear_fc1")


def test_use_dora_is_off_by_default_round_trips_and_old_configs_read_it_as_off():
    from megatron_lora.core.checkpoint.files import CONFIG_FIELDS_THAT_MUST_MATCH, saved_config_value

    assert LoRAConfig().use_dora is False
    cfg = LoRAConfig(rank=4, use_dora=True)
    assert cfg.to_dict()["use_dora"] is True and LoRAConfig.from_dict(cfg.to_dict()) == cfg
    older = {k: v for k, v in LoRAConfig(rank=4).to_dict().items() if k != "use_dora"}
    assert LoRAConfig.from_dict(older).use_dora is False
    assert "use_dora" in CONFIG_FIELDS_THAT_MUST_MATCH and saved_config_value(older, "use_dora") is False


def test_use_dora_with_shared_expert_adapters_is_refused():
    with pytest.raises(ValueError, match="use_dora with expert_adapters='shared' is not supported.*per_expert"):
        LoRAConfig(use_dora=True, expert_adapters="shared")


def test_is_lora_key_names_the_dora_magnitude():
    from megatron_lora.core.layers import is_lora_key

    assert is_lora_key("decoder.layers.0.mlp.linear_fc2.lora_magnitude")
    assert not is_lora_key("decoder.layers.0.mlp.linear_fc2.weight")
