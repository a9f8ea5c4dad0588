"""`LoRAConfig`: the single source of truth for every LoRA knob.

Layers receive it explicitly (never global args); the argparse group of the training script is
generated from its fields, so each field's ``help`` metadata is the user-facing documentation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterable, Tuple

DEFAULT_TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# Scopes a target may name (``experts.linear_fc1``): the module that holds the linear.
TARGET_SCOPES = ("self_attention", "mlp", "experts", "shared_experts")
INIT_METHODS = ("kaiming", "gaussian")
BRANCH_KERNEL_CHOICES = ("auto", "torch", "triton")  # LoRAConfig.branch_kernels; kernels.select reads it too
EXPERT_ADAPTER_CHOICES = ("per_expert", "shared")  # LoRAConfig.expert_adapters (docs/moe.md)


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapter settings (Hu et al. 2021, rsLoRA: Kalajdzievski 2023)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r (> 0)."})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA branch input, 0 <= p < 1."}
    )
    target_modules: Tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES,
        metadata={"help": "Names of the Megatron parallel linears that get an adapter: a name "
                          "(linear_fc1: every one, dense MLP, routed and shared experts) or a scoped "
                          "name (experts.linear_fc1, shared_experts.linear_fc1, mlp.linear_fc1, "
                          "self_attention.linear_qkv); 'router': a mixture of experts' router gating."},
    )
    init: str = field(
        default="kaiming",
        metadata={"help": "Init of lora_A: 'kaiming' (uniform, logical fan-in) or 'gaussian'."},
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Scale by alpha / sqrt(r) (rank-stabilised LoRA)."}
    )
    seed: int = field(
        default=1234,
        metadata={"help": "Seed of lora_A; with the layer's name it fixes A for any TP/PP layout."},
    )
    branch_kernels: str = field(
        default="auto",
        metadata={"help": "Kernels of the rank-r branch: 'auto' (plain torch unless a GPU benchmark "
                          "row in kernels.MEASURED shows Triton faster at the shape; none exists), "
                          "'torch' or 'triton' (opt-in, unmeasured)."},
    )
    recompute_branch_input: bool = field(
        default=False,
        metadata={"help": "Keep no copy of the branch input for backward: recompute it from what "
                          "the base keeps anyway (the norm input of linear_qkv / linear_fc1, the "
                          "fc1 output of linear_fc2). Exact; costs one norm / activation pass."},
    )
    per_projection: bool = field(
        default=False,
        metadata={"help": "One rank-r A per projection of a fused linear_qkv (q, k, v) and of a gated "
                          "linear_fc1 (gate, up), as PEFT has: lora_A stacks them [P*r, in], lora_B stays "
                          "[out, r] (each row feeds one projection). PEFT adapters then import and export "
                          "at rank r; other targets are unchanged."},
    )
    expert_adapters: str = field(
        default="per_expert",
        metadata={"help": "Adapters of the routed MoE experts (SequentialMLP): 'per_expert' (one adapter "
                          "per expert) or 'shared' (one adapter per layer and linear, shared by all its "
                          "experts; saved under every expert's name, identical copies). Not Megatron's "
                          "shared_experts, whose MLP has one adapter either way."},
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA (weight-decomposed LoRA, Liu et al. 2024): a trainable magnitude m per output "
                          "feature, initialised to the base weight's row norm, scales the adapted layer: "
                          "y = m / ||W + s B A|| * (X (W + s B A)^T) + bias, the norm per output feature and "
                          "detached. Column layers compute the norm locally; row layers send its partial sums "
                          "in the base layer's one reduction: no extra collective (docs/design.md §18)."},
    )

    def __post_init__(self):
        # Accept any iterable of names (argparse gives a list) but store an immutable tuple.
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        object.__setattr__(self, "target_modules", tuple(targets))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}.")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRAConfig.alpha must be a finite number > 0, got {self.alpha!r}.")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRAConfig.dropout must satisfy 0 <= dropout < 1, got {self.dropout!r}.")
        if self.init not in INIT_METHODS:
            raise ValueError(f"LoRAConfig.init must be one of {INIT_METHODS}, got {self.init!r}.")
        if self.branch_kernels not in BRANCH_KERNEL_CHOICES:
            raise ValueError(
                f"LoRAConfig.branch_kernels must be one of {BRANCH_KERNEL_CHOICES}, got {self.branch_kernels!r}.")
        if self.expert_adapters not in EXPERT_ADAPTER_CHOICES:
            raise ValueError(
                f"LoRAConfig.expert_adapters must be one of {EXPERT_ADAPTER_CHOICES}, got {self.expert_adapters!r}.")
        if self.use_dora and self.expert_adapters == "shared":
            raise ValueError(
                "LoRAConfig.use_dora with expert_adapters='shared' is not supported: each expert's magnitude "
                "is the norm of its own weight. Use expert_adapters='per_expert' (--lora-expert-adapters).")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(
                "LoRAConfig.target_modules must be a non-empty list of module names such as "
                f"{DEFAULT_TARGET_MODULES}, got {self.target_modules!r}."
            )

    @property
    def scaling(self) -> float:
        """The factor s in dW = s * B @ A."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict:
        """JSON-friendly form, written beside saved adapters."""
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown LoRAConfig fields {unknown}; known fields: {sorted(names)}.")
        return cls(**d)

    def targets(self, name: str) -> bool:
        """Whether the module called ``name`` (qualified or a spec field path) gets an adapter."""
        return any(n in self.target_modules for n in target_names(name))

    def check_targets_exist(self, available: Iterable[str]) -> None:
        """Fail early when a target name matches no parallel linear of the model."""
        available = sorted(set(available))
        missing = [t for t in self.target_modules if t not in available]
        if missing:
            raise ValueError(
                f"LoRA target module(s) {missing} match no Megatron parallel linear (or MoE router) in this "
                f"model. Targets that exist: {available}. Fix LoRAConfig.target_modules "
                "(--lora-target-modules)."
            )


def target_names(name: str) -> Tuple[str, ...]:
    """The names a target may give a module: its leaf (``linear_fc1``) and its scoped name, the
    leaf under its nearest named holder (``experts.linear_fc1``; indices and ``local_experts``
    skipped), so ``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1`` is
    ``("linear_fc1", "experts.linear_fc1")``."""
    parts = [p for p in name.split(".") if p and not p.isdigit() and p != "local_experts"]
    return (parts[-1], f"{parts[-2]}.{parts[-1]}") if len(parts) > 1 else tuple(parts)
