import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_lora import LoRAConfig
from megatron_lora.core.init import init_lora_factors, logical_lora_a, name_seed
from megatron_lora.core.layout import AdapterLayout


def test_kaiming_bound_uses_the_logical_fan_in():
    a = logical_lora_a((8, 4096), "kaiming", seed=1, name="decoder.layers.3.mlp.linear_fc2")
    bound = 1 / math.sqrt(4096)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.99 * bound  # uniform fills the interval, so the bound is the fan-in's
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound


def test_gaussian_std_is_one_over_rank():
    a = logical_lora_a((16, 4096), "gaussian", seed=1, name="x")
    assert abs(a.std().item() - 1 / 16) < 0.002


def test_a_depends_on_seed_and_name_only():
    shape = (4, 32)
    same = logical_lora_a(shape, "kaiming", 5, "decoder.layers.1.self_attention.linear_qkv")
    assert torch.equal(same, logical_lora_a(shape, "kaiming", 5, "decoder.layers.1.self_attention.linear_qkv"))
    assert not torch.equal(same, logical_lora_a(shape, "kaiming", 5, "decoder.layers.2.self_attention.linear_qkv"))
    assert not torch.equal(same, logical_lora_a(shape, "kaiming", 6, "decoder.layers.1.self_attention.linear_qkv"))


# name_seed of these (seed, name) pairs, pinned: the derivation (sha256 of "seed/name", first 8
# bytes little-endian, 63 bits) decides every logical A, so changing it breaks saved adapters' init.
PINNED = {(1234, "decoder.layers.0.mlp.linear_fc1"): 1043893227302232094, (0, ""): 8625427350392076063}


def test_name_seed_is_the_pinned_value():
    for (seed, name), expected in PINNED.items():
        assert name_seed(seed, name) == expected, (seed, name)


def documented_seed(seed, name):
    """docs/design.md §5, spelled out: sha256 of "seed/name", first 8 bytes little-endian, 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") % 2 ** 63


def test_name_seed_is_the_documented_63_bit_hash():
    """Catches a derivation that drifts from the documented one (another hash, byte order or
    truncation, Python's salted ``hash``) or that leaves the 63 bits torch's generators take: the
    values are checked for many names, not for literals pinned in this file."""
    names = [f"decoder.layers.{i}.{p}" for i in range(64) for p in ("mlp.linear_fc1", "self_attention.linear_qkv")]
    seeds = [name_seed(s, n) for s in (0, 1234) for n in names]
    assert seeds == [documented_seed(s, n) for s in (0, 1234) for n in names]
    assert all(0 <= v < 2 ** 63 for v in seeds)
    assert max(seeds) >= 2 ** 62  # the top bit kept: 256 draws all below 2^62 has odds 2^-256


class _Layer:
    """What ``init_lora_factors`` reads of a LoRA layer at TP = 1 (no process group)."""

    def __init__(self, layout, cfg, in_features, out_features):
        self.lora_config, self.lora_layout, self.lora_group = cfg, layout, None
        self._shapes = layout.logical_shapes(in_features, out_features, cfg.rank)
        self.lora_A = torch.full(self._shapes["lora_A"], float("nan"))
        self.lora_B = torch.full(self._shapes["lora_B"], float("nan"))

    def lora_logical_shape(self, factor):
        return self._shapes[factor]


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("layout", [AdapterLayout.column(), AdapterLayout.column(projections=3), AdapterLayout.row()],
                         ids=["column", "column-3-projections", "row"])
def test_tp1_init_is_the_documented_draw(layout, init):
    """The TP = 1 factors ``init_lora_factors`` writes equal an independent recomputation of
    docs/design.md §5: a CPU generator seeded with the documented 63-bit hash of "seed/name" fills
    the logical ``[P*r, in]`` A by torch's own ``kaiming_uniform_(a=sqrt(5))`` (bound
    ``1/sqrt(in)``, PEFT's and nn.Linear's) or ``normal_(0, 1/r)``; B is zero.

    Catches (the TP-invariance tests compare TP = t with TP = 1 and cannot): a different seed
    derivation or name, a transposed or reordered draw, a bound from another fan-in or gain
    (``kaiming_uniform_``'s default a = 0 gives sqrt(6) times PEFT's A), a gaussian std of
    1/sqrt(r) or of the stacked rank P*r, and a B that is not zeroed."""
    cfg = LoRAConfig(rank=4, alpha=8, seed=1234, init=init)
    name = "decoder.layers.5.mlp.linear_fc2"
    layer = _Layer(layout, cfg, in_features=96, out_features=64)
    init_lora_factors(layer, name)

    expected = torch.empty(layout.projections * cfg.rank, 96)
    gen = torch.Generator().manual_seed(documented_seed(cfg.seed, name))
    if init == "kaiming":
        torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=gen)
    else:
        torch.nn.init.normal_(expected, 0.0, 1.0 / cfg.rank, generator=gen)
    torch.testing.assert_close(layer.lora_A, expected, rtol=1e-6, atol=0)
    assert torch.count_nonzero(layer.lora_B) == 0 and not layer.lora_B.isnan().any()
    assert layer.lora_init_name == name


@pytest.mark.parametrize("hash_seed", ["1", "2"])
def test_name_seed_is_stable_across_processes(hash_seed):
    """A fresh interpreter with another PYTHONHASHSEED (a salted ``hash()`` would differ) agrees."""
    code = ("import json, sys; from megatron_lora.core.init import name_seed; "
            "print(json.dumps([name_seed(s, n) for s, n in json.loads(sys.argv[1])]))")
    pairs = list(PINNED)
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(pairs)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == [name_seed(s, n) for s, n in pairs]
