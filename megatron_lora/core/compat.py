"""Every Megatron-Core call whose spelling differs between supported releases lives here.

Supported: megatron-core >= MIN_VERSION (CI runs the suite on MIN_VERSION and 0.16.1). The layers
subclass the public ColumnParallelLinear / RowParallelLinear and rely on their ``tp_group``
attribute. Calls are switched by feature (a signature, an attribute) where possible: forks may
backport a change without changing the version.
"""

from __future__ import annotations

import inspect
import types

from packaging.version import Version

import megatron.core

MIN_VERSION = "0.13.0"
MEGATRON_VERSION = Version(getattr(megatron.core, "__version__", "0"))

if MEGATRON_VERSION < Version(MIN_VERSION):
    raise ImportError(
        f"megatron_lora needs megatron-core >= {MIN_VERSION}, found {MEGATRON_VERSION}. "
        f"Upgrade with: pip install 'megatron-core>={MIN_VERSION}'"
    )


def te_tp_group(te_module):
    """The TP group of one of Megatron's TE wrappers: an attribute in newer releases (0.16 has it,
    0.13 does not), else the global TP group (TE LoRA layers refuse expert layers)."""
    group = getattr(te_module, "_tp_group", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group


def _accepts(fn, name: str) -> bool:
    """Feature test by signature: forks may backport a keyword without changing the version."""
    return name in inspect.signature(fn).parameters


def make_sharded_tensors_for_checkpoint(state_dict, prefix, axis_map, sharded_offsets, tp_group,
                                        metadata):
    """Megatron's helper; from 0.16 it takes the TP and DP(+CP) groups explicitly."""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint as make

    if not _accepts(make, "tp_group"):
        return make(state_dict, prefix, axis_map, sharded_offsets)
    dp_cp_group = (metadata or {}).get("dp_cp_group")
    if dp_cp_group is None:
        dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return make(state_dict, prefix, axis_map, sharded_offsets, tp_group=tp_group, dp_cp_group=dp_cp_group)


def apply_swiglu_sharded_factory(sharded_tensor, sharded_offsets, metadata):
    """Megatron's [gate; up] factory for gated linear_fc1 tensors (its MLP uses it for the base)."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory as factory

    if _accepts(factory, "singleton_local_shards"):
        singleton = (metadata or {}).get("singleton_local_shards", False)
        return factory(sharded_tensor, sharded_offsets, singleton)
    return factory(sharded_tensor, sharded_offsets)


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict, is_loading=False):
    """The optimizer's sharded state, in a format that loads at another TP / PP / DP layout.

    The distributed optimizer's default format ('fully_sharded_model_space') relies on
    ``ShardedTensor.flattened_range``, which 0.16 refuses; releases that have the
    'fully_reshardable' format get it (LoRA state is small, so gathering it on save is cheap).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    metadata = None
    if hasattr(DistributedOptimizer, "sharded_param_state_fully_reshardable"):
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)



def hybrid_model_api() -> types.SimpleNamespace:
    """Megatron's HybridModel classes (``HybridModel``, ``HybridStack``, ``HybridStackSubmodules``,
    ``MLPLayer``), which exist from megatron-core 0.19; a clear error before."""
    try:
        from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
        from megatron.core.models.hybrid.hybrid_model import HybridModel
        from megatron.core.ssm.mlp_layer import MLPLayer
    except ImportError as err:
        raise ImportError(f"HybridModel needs megatron-core >= 0.19, found {MEGATRON_VERSION} ({err}); "
                          "pip install 'megatron-core>=0.19' (Python >= 3.12).") from None
    return types.SimpleNamespace(HybridModel=HybridModel, HybridStack=HybridStack,
                                 HybridStackSubmodules=HybridStackSubmodules, MLPLayer=MLPLayer)


def keep_checkpoint_writer_in_process() -> None:
    """Stop Megatron's dist-checkpoint writer from starting a *spawn* ``Manager`` for its results.

    ``filesystem_async`` (0.13 - 0.19) creates, on a process's first save, a queue served by a
    spawned manager process: spawn re-imports ``__main__``, so a user script without an
    ``if __name__ == "__main__":`` guard re-runs itself there and blocks forever in
    ``init_process_group``, and the server outlives a killed rank. A *fork* manager serves the same
    queue without re-importing anything; started inside ``checkpoint.orphans.save_without_orphans``
    it dies with the rank. (A plain multiprocessing queue would not do: its ``put`` is flushed by a
    feeder thread, and Megatron reads it back at once with ``get_nowait``.)
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # pragma: no cover - a release without the async writer
        return
    if getattr(filesystem_async, "_results_queue", False) is None:
        from torch import multiprocessing

        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
