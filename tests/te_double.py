"""A CPU test double of Transformer Engine's PyTorch module API, for CI without a GPU.

Real TE needs CUDA, so on CPU nothing would ever run ``te_layers.py`` through Megatron-Core's
own TE wrappers (``megatron/core/extensions/transformer_engine.py``). ``install()`` puts a small
``transformer_engine`` package into ``sys.modules``; Megatron then builds its TE spec on it and
our LoRA TE layers run *unchanged* through Megatron's wrappers (constructor keywords,
``te_return_bias``, output tuples, TP groups, ``_extra_state``) on gloo processes.

What the double implements, read from TE's source (``module/linear.py``,
``module/layernorm_linear.py``, ``module/base.py``; TE 2.x):

* the module attributes TE's forward reads each call: ``parallel_mode``, ``tp_size``,
  ``tp_group`` (``set_tensor_parallel_group``), ``sequence_parallel``, ``return_bias``,
  ``apply_bias``, ``gemm_bias_unfused_add``, ``return_layernorm_output(_gathered)``;
* TE's own TP communication when those say so (column: SP all-gather of the input or of the norm
  output, backward reduction of dgrad before the norm's backward; row: all-reduce or
  reduce-scatter, then the bias), so a base TE model computes what TE computes;
* output tuples ``out[, bias][, ln_out]``; parameter names ``weight``, ``bias``,
  ``layer_norm_weight``, ``layer_norm_bias``; TP / ``sequence_parallel`` parameter attributes as
  ``reset_parameters`` sets them; ``init_method`` run on the local shard under the RNG tracker;
* ``GroupedLinear`` (MoE experts, ``moe_grouped_gemm``): per-GEMM ``weight{i}`` / ``bias{i}``,
  ``forward(x, m_splits)``, communication-free as Megatron builds it;
* causal / no-mask dot-product attention on ``sbhd`` tensors (GQA), and TE's norms.

It is not TE: no FP8, no userbuffers, no fused kernels, no ``fuse_wgrad_accumulation`` on TE's
own weights (refused). A bug in how we read TE's contract is shared with the double, which is why
``tests/gpu`` runs the same comparisons against the real TE on a GPU.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types

import torch
import torch.nn.functional as F

VERSION = "2.6.0"  # a TE 2.x the Megatron-Core versions we support accept; no feature above 2.6 is used


def _megatron_comm():
    from megatron.core.tensor_parallel import mappings

    return mappings


def _group_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


class TransformerEngineBaseModule(torch.nn.Module):
    """What ``module/base.py`` gives every TE module that our code and Megatron's touch."""

    def __init__(self, name=None):
        super().__init__()
        self.name = name
        self.fp8 = self.fp8_calibration = False
        self.param_init_meta = {}
        self.tp_group, self.tp_group_initialized = None, False

    def set_tensor_parallel_group(self, tp_group) -> None:
        self.tp_group = tp_group
        self.tp_group_initialized = True

    def register_parameter(self, name, param, init_fn=None, get_rng_state_tracker=None, **unused):
        super().register_parameter(name, param)
        if param is not None:
            self.param_init_meta[name] = (init_fn, get_rng_state_tracker)

    def reset_parameters(self) -> None:
        for name, param in self.named_parameters(recurse=False):
            init_fn, tracker = self.param_init_meta[name]
            if init_fn is None:
                continue
            rng = contextlib.nullcontext()
            if tracker is not None:
                tracker_name = getattr(self, "rng_tracker_name", None)
                rng = tracker().fork(tracker_name) if tracker_name else tracker().fork()
            with rng, torch.no_grad():
                init_fn(param)

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)  # TE's value without FP8

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor) and state.numel():
            raise RuntimeError("te_double: FP8 extra state cannot be loaded (no FP8 here)")


def _set_tp_attributes(param, dim):
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1


# TE's Linear / LayerNormLinear keywords the double models, with TE's defaults.
_LINEAR_KEYWORDS = dict(sequence_parallel=False, fuse_wgrad_accumulation=False, tp_group=None,
                        tp_size=1, get_rng_state_tracker=None, rng_tracker_name=None,
                        init_method=None, bias=True, return_bias=False, params_dtype=None,
                        parallel_mode=None, device="cuda")


class _LinearBase(TransformerEngineBaseModule):
    """TE's Linear / LayerNormLinear construction (sizes, TP attributes, bias flags) and forward."""

    def _setup_linear(self, in_features, out_features, **kwargs):
        k = {name: kwargs.pop(name, default) for name, default in _LINEAR_KEYWORDS.items()}
        unmodelled = {name: v for name, v in kwargs.items() if v and name != "ub_name"}
        if unmodelled or k["parallel_mode"] not in (None, "column", "row"):
            raise NotImplementedError(f"te_double: {unmodelled or k['parallel_mode']} is not modelled "
                                      "(userbuffers, delayed wgrad, symmetric all-reduce, splits)")
        tp_group = k["tp_group"]
        self.tp_size = k["tp_size"] if tp_group is None else _group_size(tp_group)
        if tp_group is not None or self.tp_size == 1:
            self.set_tensor_parallel_group(tp_group)
        self.parallel_mode, self.fuse_wgrad_accumulation = k["parallel_mode"], k["fuse_wgrad_accumulation"]
        self.in_features, self.out_features = in_features, out_features
        if self.parallel_mode == "column":
            self.out_features //= self.tp_size
        elif self.parallel_mode == "row":
            self.in_features //= self.tp_size
        self.sequence_parallel = self.tp_size > 1 and k["sequence_parallel"]
        self.use_bias, self.return_bias = k["bias"], k["return_bias"]
        self.apply_bias = self.use_bias and not self.return_bias
        self.rng_tracker_name = k["rng_tracker_name"]
        like = dict(dtype=k["params_dtype"] or torch.get_default_dtype(), device=k["device"])
        self.register_parameter("weight", torch.nn.Parameter(torch.empty(self.out_features, self.in_features, **like)),
                                init_fn=k["init_method"], get_rng_state_tracker=k["get_rng_state_tracker"])
        if self.use_bias:
            self.register_parameter("bias", torch.nn.Parameter(torch.zeros(self.out_features, **like)),
                                    init_fn=torch.nn.init.zeros_)
        else:
            self.bias = torch.Tensor().to(**like)
        return like

    def _finish_linear(self):
        """``reset_parameters``: initialise, then the TP / sequence-parallel attributes."""
        self.reset_parameters()
        _set_tp_attributes(self.weight, 1 if self.parallel_mode == "row" else 0)
        if self.use_bias:
            if self.parallel_mode == "row":
                self.bias.sequence_parallel = self.sequence_parallel
            elif self.parallel_mode == "column":
                _set_tp_attributes(self.bias, 0)
        self.gemm_bias_unfused_add = self.parallel_mode == "row" and self.apply_bias

    def _column_input(self, x):
        """Column: SP all-gather of the input; dgrad reduced in backward (before any norm)."""
        if self.parallel_mode != "column" or self.tp_size == 1:
            return x
        comm, group = _megatron_comm(), self.tp_group
        if self.sequence_parallel:
            return comm.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
        return comm.copy_to_tensor_model_parallel_region(x, group=group)

    def _gemm(self, x_total):
        """The GEMM of the gathered input, then TE's row reduction and bias handling."""
        if self.fuse_wgrad_accumulation and self.weight.requires_grad:
            raise NotImplementedError("te_double: fuse_wgrad_accumulation on a trainable TE weight")
        comm, group = _megatron_comm(), self.tp_group
        bias = self.bias if self.apply_bias and not self.gemm_bias_unfused_add else None
        out = F.linear(x_total, self.weight, bias)
        if self.parallel_mode == "row" and self.tp_size > 1:
            reduce = (comm.reduce_scatter_to_sequence_parallel_region if self.sequence_parallel
                      else comm.reduce_from_tensor_model_parallel_region)
            out = reduce(out, group=group)
        if self.gemm_bias_unfused_add:
            out = out + self.bias
        return out


class Linear(_LinearBase):
    def __init__(self, in_features, out_features, name=None, **kwargs):
        super().__init__(name)
        self._setup_linear(in_features, out_features, **kwargs)
        self._finish_linear()

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        out = self._gemm(self._column_input(inp))
        return (out, self.bias) if self.return_bias else out


class LayerNormLinear(_LinearBase):
    def __init__(self, in_features, out_features, eps=1e-5, normalization="LayerNorm",
                 return_layernorm_output=False, return_layernorm_output_gathered=False,
                 zero_centered_gamma=False, name=None, **kwargs):
        super().__init__(name)
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"te_double: normalization {normalization!r}")
        self.normalization, self.eps, self.zero_centered_gamma = normalization, eps, zero_centered_gamma
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = return_layernorm_output and return_layernorm_output_gathered
        like = self._setup_linear(in_features, out_features, **kwargs)
        gamma = torch.zeros if zero_centered_gamma else torch.ones
        self.register_parameter("layer_norm_weight", torch.nn.Parameter(gamma(in_features, **like)))
        self.layer_norm_bias = None
        if normalization == "LayerNorm":
            self.register_parameter("layer_norm_bias", torch.nn.Parameter(torch.zeros(in_features, **like)))
        self._finish_linear()
        for param in (self.layer_norm_weight, self.layer_norm_bias):
            if param is not None:
                param.sequence_parallel = self.sequence_parallel

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        ln_out = _normalize(inp, self.normalization, self.layer_norm_weight, self.layer_norm_bias,
                            self.eps, self.zero_centered_gamma)
        ln_total = self._column_input(ln_out)
        out = self._gemm(ln_total)
        extra = (self.bias,) if self.return_bias else ()
        if self.return_layernorm_output:
            extra += (ln_total if self.return_layernorm_output_gathered else ln_out,)
        return (out,) + extra if extra else out


# TE's GroupedLinear keywords the double models, with TE's defaults (module/grouped_linear.py).
_GROUPED_KEYWORDS = dict(sequence_parallel=False, fuse_wgrad_accumulation=False, tp_group=None,
                         tp_size=1, get_rng_state_tracker=None, rng_tracker_name=None,
                         init_method=None, bias=True, return_bias=False, params_dtype=None,
                         parallel_mode=None, device="cuda")


class GroupedLinear(TransformerEngineBaseModule):
    """TE's ``GroupedLinear``: ``num_gemms`` linears ``weight0 .. weight{n-1}`` (``bias0 ..``), and
    ``forward(x, m_splits)`` computes ``x_e W_e^T (+ b_e)`` on consecutive row blocks of ``x``,
    ``m_splits[e]`` rows for GEMM ``e`` (one GEMM per local expert in Megatron's MoE).

    Megatron builds it communication-free whenever it splits the experts' weights (explicit expert
    communication: ``parallel_mode=None``, ``tp_size=1``; the token dispatcher moves the tokens),
    and with a parallel mode only where the expert-TP group has one rank. That is all modelled:
    TP communication inside a grouped GEMM is refused, as are FP8 and delayed wgrad.
    """

    def __init__(self, num_gemms, in_features, out_features, name=None, **kwargs):
        super().__init__(name)
        k = {key: kwargs.pop(key, default) for key, default in _GROUPED_KEYWORDS.items()}
        unmodelled = {key: v for key, v in kwargs.items() if v and key != "ub_name"}
        tp_group = k["tp_group"]
        self.tp_size = k["tp_size"] if tp_group is None else _group_size(tp_group)
        if unmodelled or (k["parallel_mode"] is not None and self.tp_size > 1):
            raise NotImplementedError(
                f"te_double: GroupedLinear with {unmodelled or 'TP communication'} is not modelled "
                "(Megatron builds grouped experts communication-free: parallel_mode=None)")
        if k["parallel_mode"] not in (None, "column", "row"):
            raise ValueError(f"te_double: parallel_mode {k['parallel_mode']!r}")
        if tp_group is not None or self.tp_size == 1:
            self.set_tensor_parallel_group(tp_group)
        self.num_gemms, self.in_features, self.out_features = num_gemms, in_features, out_features
        self.parallel_mode, self.fuse_wgrad_accumulation = k["parallel_mode"], k["fuse_wgrad_accumulation"]
        self.sequence_parallel = False  # tp_size is 1
        self.use_bias, self.return_bias = k["bias"], k["return_bias"]
        self.apply_bias = self.use_bias and not self.return_bias
        self.rng_tracker_name = k["rng_tracker_name"]
        self.fp8_meta = {"fp8_checkpoint": False}
        like = dict(dtype=k["params_dtype"] or torch.get_default_dtype(), device=k["device"])
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", torch.nn.Parameter(torch.empty(out_features, in_features, **like)),
                                    init_fn=k["init_method"], get_rng_state_tracker=k["get_rng_state_tracker"])
            if self.use_bias:
                self.register_parameter(f"bias{i}", torch.nn.Parameter(torch.zeros(out_features, **like)),
                                        init_fn=torch.nn.init.zeros_)
            else:
                setattr(self, f"bias{i}", torch.Tensor().to(**like))
        self.reset_parameters()
        for i in range(num_gemms):  # TE marks every weight TP-parallel, dim 0 unless row
            _set_tp_attributes(getattr(self, f"weight{i}"), 1 if self.parallel_mode == "row" else 0)
            if self.use_bias and self.parallel_mode == "column":
                _set_tp_attributes(getattr(self, f"bias{i}"), 0)
            elif self.use_bias and self.parallel_mode == "row":
                getattr(self, f"bias{i}").sequence_parallel = self.sequence_parallel

    def init_fp8_metadata(self, num_gemms=1) -> None:
        """Megatron's load hook calls it; without FP8 there is nothing to set up."""

    def forward(self, inp, m_splits, is_first_microbatch=None):
        if len(m_splits) != self.num_gemms:
            raise ValueError(f"te_double: {len(m_splits)} splits for {self.num_gemms} GEMMs")
        if self.fuse_wgrad_accumulation and any(p.requires_grad for p in self.parameters(recurse=False)):
            raise NotImplementedError("te_double: fuse_wgrad_accumulation on a trainable TE weight")
        m_splits = [int(m) for m in m_splits]
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        biases = [getattr(self, f"bias{i}") if self.apply_bias else None for i in range(self.num_gemms)]
        rows = torch.split(inp.reshape(-1, self.in_features), m_splits)
        out = torch.cat([F.linear(x, w, b) for x, w, b in zip(rows, weights, biases)])
        out = out.view(*inp.shape[:-1], self.out_features)
        if self.return_bias:
            return out, [getattr(self, f"bias{i}") for i in range(self.num_gemms)]
        return out


def _normalize(x, normalization, weight, bias, eps, zero_centered_gamma):
    gamma = weight + 1 if zero_centered_gamma else weight
    if normalization == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), gamma, eps)
    return F.layer_norm(x, (x.shape[-1],), gamma, bias, eps)


class _Norm(TransformerEngineBaseModule):
    normalization = "LayerNorm"

    def __init__(self, normalized_shape=None, eps=1e-5, sequence_parallel=False, params_dtype=None,
                 zero_centered_gamma=False, device="cuda", hidden_size=None, **unused):
        # TE 2.x names the size normalized_shape (megatron-core 0.19 passes it so) and still
        # accepts the older hidden_size keyword (megatron-core 0.13-0.16 pass that).
        hidden_size = normalized_shape if normalized_shape is not None else hidden_size
        super().__init__()
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        dtype = params_dtype or torch.get_default_dtype()
        gamma = torch.zeros if zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(gamma(hidden_size, dtype=dtype, device=device))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
                     if self.normalization == "LayerNorm" else None)
        for param in self.parameters():
            param.sequence_parallel = sequence_parallel

    def forward(self, x):
        return _normalize(x, self.normalization, self.weight, self.bias, self.eps, self.zero_centered_gamma)


class LayerNorm(_Norm):
    normalization = "LayerNorm"


class RMSNorm(_Norm):
    normalization = "RMSNorm"


class DotProductAttention(TransformerEngineBaseModule):
    """Softmax attention on ``[s, b, heads, d]`` (qkv_format "sbhd"), causal or unmasked."""

    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 attn_mask_type="causal", tp_size=1, tp_group=None, softmax_scale=None,
                 window_size=None, cp_group=None, **unused):
        super().__init__()
        if attention_dropout or window_size is not None or cp_group is not None:
            raise NotImplementedError("te_double: attention dropout, windows and CP are not modelled")
        d = kv_channels[0] if isinstance(kv_channels, tuple) else kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
        self.attn_mask_type = attn_mask_type

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **unused):
        mask_type = attn_mask_type or self.attn_mask_type
        if mask_type not in ("causal", "no_mask"):
            raise NotImplementedError(f"te_double: attn_mask_type {mask_type!r}")
        s, b, heads, d = query.shape
        repeat = heads // key.shape[2]
        q = query.permute(1, 2, 0, 3)  # [b, h, s, d]
        k = key.repeat_interleave(repeat, dim=2).permute(1, 2, 0, 3)
        v = value.repeat_interleave(repeat, dim=2).permute(1, 2, 0, 3)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        if mask_type == "causal":
            future = torch.ones(s, key.shape[0], dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v)  # [b, h, s, d]
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)


class FP8GlobalStateManager:
    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def fp8_graph_capturing() -> bool:
        return False


@contextlib.contextmanager
def fp8_autocast(enabled=False, **unused):
    if enabled:
        raise NotImplementedError("te_double: FP8 is not modelled")
    yield


@contextlib.contextmanager
def fp8_model_init(enabled=False, **unused):
    """FP8 parameter creation (megatron-core 0.19 imports it with ``fp8_autocast``)."""
    if enabled:
        raise NotImplementedError("te_double: FP8 parameters are not modelled")
    yield


class QuantizedTensor(torch.Tensor):
    """TE 2.x's FP8 tensor base class; no tensor here is one (Megatron asks with isinstance)."""


@contextlib.contextmanager
def activation_recompute_forward(activation_recompute=False, recompute_phase=False):
    yield  # TE keeps FP8 scaling state across recomputation here; without FP8 there is none


def _not_modelled(name):
    """A TE class Megatron subclasses or names in annotations at import, and our CPU runs never
    build: FP8 recipes (``te.common.recipe``), fused ops (``te.pytorch.ops``),
    TE's RNG tracker (Megatron's own is used). Building one raises."""
    if name.startswith("__"):
        raise AttributeError(name)

    def refuse(*args, **kwargs):
        raise NotImplementedError(f"te_double: {name} is not modelled")

    return type(name, (), {"__init__": refuse})


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__path__ = []  # a package: a missing submodule is an ImportError, as for a real install
    module.__dict__.update(attrs)
    return module


def rank_main(rank, setup, packed_call, results_q):
    """A rank that installs the double first: ``packed_call`` is the pickled ``(body, fn, args)``
    of the caller (``run_distributed(..., te_double=True)``), unpickled only now, so that whatever
    it imports (Megatron) sees the double; then ``body(rank, setup, fn, args, results_q)`` runs."""
    import pickle
    import traceback

    try:
        install()
        body, fn, args = pickle.loads(packed_call)
    except BaseException:  # noqa: BLE001 - reported to the parent like any rank failure
        results_q.put((rank, False, traceback.format_exc()))
        return

    body(rank, setup, fn, args, results_q)


def install() -> None:
    """Make ``import transformer_engine`` give the double in this process (before Megatron's TE import)."""
    if "megatron.core.extensions.transformer_engine" in sys.modules and "transformer_engine" not in sys.modules:
        raise RuntimeError("te_double.install() must run before Megatron-Core is imported: its TE "
                           "extension already settled on its no-TE fallback in this process")
    present = sys.modules.get("transformer_engine")
    if present is not None:
        if getattr(present, "IS_TE_DOUBLE", False):
            return
        raise RuntimeError("te_double.install(): the real transformer_engine is already imported here")
    layout = {
        "transformer_engine": dict(__version__=VERSION, IS_TE_DOUBLE=True),
        "transformer_engine.common": {},
        "transformer_engine.common.recipe": dict(__getattr__=_not_modelled),
        "transformer_engine.pytorch": dict(
            Linear=Linear, LayerNormLinear=LayerNormLinear, LayerNorm=LayerNorm, RMSNorm=RMSNorm,
            DotProductAttention=DotProductAttention, GroupedLinear=GroupedLinear,
            fp8_autocast=fp8_autocast),
        "transformer_engine.pytorch.fp8": dict(FP8GlobalStateManager=FP8GlobalStateManager,
                                               fp8_autocast=fp8_autocast, fp8_model_init=fp8_model_init),
        "transformer_engine.pytorch.distributed": dict(
            CudaRNGStatesTracker=_not_modelled("CudaRNGStatesTracker"),
            activation_recompute_forward=activation_recompute_forward),
        "transformer_engine.pytorch.ops": dict(__getattr__=_not_modelled),
        "transformer_engine.pytorch.tensor": dict(QuantizedTensor=QuantizedTensor),
    }
    modules = {name: _module(name, **attrs) for name, attrs in layout.items()}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    sys.modules.update(modules)
