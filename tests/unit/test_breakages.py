"""The harness tests' breakages patch the library only inside their ``with`` block."""

import pytest

from megatron_lora.core import collectives, inject, layers
from tests.distributed import breakages

PATCHED = {breakages.no_rider_sum: [(collectives, "reduce_with_rider")],
           breakages.dora_norm_own_all_reduce: [(collectives, "reduce_with_rider")],
           breakages.shard_fan_in_init: [(layers, "init_lora_factors"), (inject, "init_lora_factors")]}


@pytest.mark.parametrize("breakage", list(PATCHED), ids=lambda b: b.__name__)
def test_breakage_patches_on_enter_and_restores_on_exit(breakage):
    before = {(m, a): getattr(m, a) for m, a in PATCHED[breakage]}
    with breakage():
        assert all(getattr(m, a) is not f for (m, a), f in before.items())
    assert all(getattr(m, a) is f for (m, a), f in before.items())
    with pytest.raises(KeyError), breakage():
        raise KeyError("restored on an exception too")
    assert all(getattr(m, a) is f for (m, a), f in before.items())
