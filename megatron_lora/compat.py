"""Every Megatron-Core call whose spelling differs between supported releases lives here.

Supported: megatron-core >= MIN_VERSION, tested on MIN_VERSION and 0.16.1. The layers subclass
the public ColumnParallelLinear / RowParallelLinear and rely on their ``tp_group`` attribute.
"""

from __future__ import annotations

import torch
from packaging.version import Version

import megatron.core
from megatron.core.tensor_parallel import mappings

MIN_VERSION = "0.13.0"
TESTED_VERSIONS = (MIN_VERSION, "0.16.1")
MEGATRON_VERSION = Version(getattr(megatron.core, "__version__", "0"))

if MEGATRON_VERSION < Version(MIN_VERSION):
    raise ImportError(
        f"megatron_lora needs megatron-core >= {MIN_VERSION}, found {MEGATRON_VERSION}. "
        f"Upgrade with: pip install 'megatron-core>={MIN_VERSION}'"
    )


def default_param_device(config):
    """Where Megatron allocates parameters for this config (its own rule)."""
    return torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward all-gather along the last dim, backward split: the base layer's gather_output."""
    return mappings.gather_from_tensor_model_parallel_region(x, group=group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward split along the last dim, backward all-gather: input_is_parallel=False."""
    return mappings.scatter_to_tensor_model_parallel_region(x, group=group)
