"""PEFT adapters of Qwen3 (qk-norm), Qwen3-MoE and Mixtral <-> megatron_lora full adapters, against
transformers + peft themselves (issue 26).

Tiny random models (fp32, 2 layers, MoE: 4 experts top-2) are built with transformers; the PEFT
adapters with peft (attention by ``target_modules``, the fused experts and the router by
``target_parameters``), every A and B random and non-zero. The reference for a conversion is peft's
own merged weights (``merge_and_unload`` minus the base, per fused expert parameter), or the logits
of ``PeftModel.from_pretrained`` on what the export wrote. Qwen3-MoE has 2I = H (the two fused
lora_B have one shape) so a mix-up of the nested keys cannot hide behind a shape error.
"""

import copy
import json
import os

import pytest
import torch

from megatron_lora.core.config import LoRAConfig
from megatron_lora.hf.mapping import ConversionError
from megatron_lora.hf.peft_adapters import megatron_from_peft, peft_from_megatron

transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
peft = pytest.importorskip("peft", reason="needs the hf extra: pip install -e '.[hf]'")

from tests.hf_moe import (  # noqa: E402
    ALPHA, ATTENTION, EXPERTS, R, ROUTER, TOKENS, arch_of as _arch, random_peft_model as _peft_model, tiny_hf as _hf,
)

def _saved(model, path):
    """(tensors, adapter_config dict) as ``save_pretrained`` writes them."""
    from safetensors.torch import load_file

    model.save_pretrained(path)
    with open(os.path.join(path, "adapter_config.json")) as f:
        return load_file(os.path.join(path, "adapter_model.safetensors")), json.load(f)


def _write(path, tensors, config):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    json.dump(config, open(os.path.join(path, "adapter_config.json"), "w"))


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _peft_merged_deltas(base, adapted):
    """{HF weight name: merged - base} of peft's own merge, float64."""
    merged = copy.deepcopy(adapted).merge_and_unload()
    before = dict(base.named_parameters())
    out = {}
    for name, w in merged.named_parameters():
        delta = w.detach().double() - before[name].detach().double()
        if delta.any():
            out[name] = delta
    return out


def _megatron_deltas(tensors, cfg, arch):
    """{HF weight name: s·B·A} of a full adapter, each Megatron layer's rows put back by hand
    (q/k/v per query group, fc1 = [gate; up], an expert's fc1 rows are gate_up_proj[e]'s)."""
    out = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A"):
            continue
        b = tensors[key[:-1] + "B"].double()
        a = a.double()
        layer, module = int(key.split(".")[2]), ".".join(key.split(".")[3:-1])
        if cfg.per_projection and module.endswith(("linear_qkv", "linear_fc1")):  # row j uses its projection's A
            rows = torch.arange(b.shape[0])
            if module.endswith("linear_qkv"):
                d, per_group = arch.head_dim, arch.num_heads // arch.num_groups * arch.head_dim
                within = rows % (per_group + 2 * d)
                proj = (within >= per_group).long() + (within >= per_group + d).long()
            else:
                proj = (rows >= b.shape[0] // 2).long()
            blocks = a.chunk(int(proj.max()) + 1)
            delta = torch.stack([b[j] @ blocks[proj[j]] for j in range(b.shape[0])])
        else:
            delta = b @ a
        delta = cfg.scaling * delta
        p = f"model.layers.{layer}."
        if module == "self_attention.linear_qkv":
            for name, d in zip(("q_proj", "k_proj", "v_proj"), arch.split(module, delta)):
                out[f"{p}self_attn.{name}.weight"] = d
        elif module == "self_attention.linear_proj":
            out[f"{p}self_attn.o_proj.weight"] = delta
        elif module == "mlp.linear_fc1":
            out[f"{p}mlp.gate_proj.weight"], out[f"{p}mlp.up_proj.weight"] = delta.chunk(2)
        elif module == "mlp.linear_fc2":
            out[f"{p}mlp.down_proj.weight"] = delta
        elif module == "mlp.router":
            out[f"{p}mlp.gate.weight"] = delta
        else:  # mlp.experts.local_experts.E.linear_fc1 / linear_fc2
            e, linear = int(module.split(".")[3]), module.split(".")[4]
            name = f"{p}mlp.experts.{'gate_up_proj' if linear == 'linear_fc1' else 'down_proj'}"
            out.setdefault(name, torch.zeros(arch.num_experts, *delta.shape, dtype=torch.float64))[e] = delta
    return out


def _assert_same_deltas(got, want, atol=1e-6):
    nonzero = {k: v for k, v in got.items() if v.any()}
    assert sorted(nonzero) == sorted(want)
    worst = max((got[name] - want[name]).abs().max().item() for name in want)
    print(f"max |delta difference| {worst:.3g} over {len(want)} weights")  # pytest -s shows it
    assert worst <= atol


def _equal(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


MODELS = {"qwen3": dict(target_modules=ATTENTION + ["gate_proj", "up_proj", "down_proj"], target_parameters=()),
          "qwen3_moe": dict(one_qkv_a=True), "mixtral": dict(one_qkv_a=True)}


_CASES = {}


def _case(model_type, tmp_path_factory):
    """(model type, base, arch, PEFT model, its saved tensors and config): for the MoE models
    attention, experts and router. Built once per model for the module's tests."""
    if model_type not in _CASES:
        base = _hf(model_type)
        adapted = _peft_model(base, **MODELS[model_type])
        tensors, config = _saved(adapted, str(tmp_path_factory.mktemp(model_type) / "peft"))
        _CASES[model_type] = (model_type, base, _arch(base), adapted, tensors, config)
    return _CASES[model_type]


@pytest.fixture(params=list(MODELS))
def case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture(params=["qwen3_moe", "mixtral"])
def moe_case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def distinct(request, tmp_path_factory):
    """A MoE model and a PEFT adapter with distinct q/k/v A's on attention and experts (no router)."""
    base = _hf(request.param)
    adapted = _peft_model(base, target_parameters=EXPERTS, seed=7)
    tensors, config = _saved(adapted, str(tmp_path_factory.mktemp(request.param) / "peft"))
    return base, _arch(base), adapted, tensors, config


def _state(model):
    """The adapter tensors as ``save_pretrained`` names them, without a file."""
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}


# ------------------------------------------------------------------------------------ import

def test_imported_update_equals_peft_merged_weights(case):
    model_type, base, arch, adapted, tensors, config = case
    full, cfg = megatron_from_peft(tensors, config, arch)
    _assert_same_deltas(_megatron_deltas(full, cfg, arch), _peft_merged_deltas(base, adapted))
    # Qwen3: distinct q/k/v (gate/up) A's stack to 3r; the MoE adapters' q/k/v share one A
    assert (cfg.rank, cfg.scaling) == (3 * R if model_type == "qwen3" else R, pytest.approx(ALPHA / R, rel=1e-15))
    if model_type == "qwen3":
        full, cfg = megatron_from_peft(tensors, config, arch, per_projection=True)
        _assert_same_deltas(_megatron_deltas(full, cfg, arch), _peft_merged_deltas(base, adapted))
        assert (cfg.rank, cfg.alpha, cfg.per_projection) == (R, ALPHA, True)
    else:
        assert cfg.target_modules == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router")
        names = [k for k in full if ".experts." in k]
        assert len(names) == 2 * 4 * 2 * 2  # layers x experts x linears x factors, global expert index


@pytest.mark.parametrize("per_projection", [False, True])
def test_distinct_attention_a_and_experts_import_with_the_peft_update(distinct, per_projection):
    base, arch, adapted, tensors, config = distinct
    full, cfg = megatron_from_peft(tensors, config, arch, per_projection=per_projection)
    _assert_same_deltas(_megatron_deltas(full, cfg, arch), _peft_merged_deltas(base, adapted))
    assert cfg.rank == (R if per_projection else 3 * R) and cfg.scaling == pytest.approx(ALPHA / R, rel=1e-15)
    # an expert keeps PEFT's rank r: gate and up share the block's one A, stored once (per projection: twice)
    a = full["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.lora_A"]
    a_peft = tensors["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"][2 * R:3 * R]
    assert torch.equal(a[:R], a_peft) and not a[(2 if per_projection else 1) * R:].any()
    if per_projection:
        assert torch.equal(a[R:2 * R], a_peft)


# ------------------------------------------------------------------------------------ export

def _load(base, tensors, config, path):
    """transformers + peft with the adapter (tensors, config) written to ``path``."""
    _write(path, tensors, config)
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def test_export_round_trip_is_bitwise_and_peft_loads_it(case, tmp_path):
    model_type, base, arch, adapted, tensors, config = case
    full, cfg = megatron_from_peft(tensors, config, arch)
    back, back_config = peft_from_megatron(full, cfg, arch, base_model_name_or_path="base")
    _equal(back, tensors)
    assert (back_config["r"], back_config["lora_alpha"]) == (R, ALPHA)
    assert sorted(back_config["target_modules"]) == sorted(config["target_modules"])
    assert sorted(back_config.get("target_parameters", [])) == sorted(config.get("target_parameters") or [])
    loaded = _load(base, back, back_config, str(tmp_path / "exported"))
    diff = (_logits(loaded) - _logits(adapted)).abs().max().item()
    print(f"max |logit difference| exported vs original PEFT ({model_type}): {diff:.3g}")
    assert diff == 0.0  # the same tensors in the same model


def test_distinct_attention_a_round_trip_is_bitwise(distinct):
    _, arch, _, tensors, config = distinct
    for per_projection in (False, True):
        full, cfg = megatron_from_peft(tensors, config, arch, per_projection=per_projection)
        back, back_config = peft_from_megatron(full, cfg, arch)
        _equal(back, tensors)
        assert back_config["r"] == R


def test_per_expert_layout_loads_in_peft_and_imports_like_the_fused_one(moe_case, tmp_path):
    model_type, base, arch, adapted, tensors, config = moe_case
    full, cfg = megatron_from_peft(tensors, config, arch)
    per_expert, per_expert_config = peft_from_megatron(full, cfg, arch, expert_layout="per_expert")
    parent, (gate, up, down) = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
                                "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}[model_type]
    p = f"base_model.model.model.layers.1.{parent}."
    assert per_expert[p + f"experts.3.{gate}.lora_A.weight"].shape == (R, 32)
    assert torch.equal(per_expert[p + f"experts.3.{gate}.lora_A.weight"],
                       per_expert[p + f"experts.3.{up}.lora_A.weight"])
    assert per_expert[p + f"experts.3.{down}.lora_B.weight"].shape == (32, R)
    assert per_expert[p + "gate.lora_B.weight"].shape == (4, R)
    assert not any("base_layer" in k or k.endswith("experts.lora_A.weight") for k in per_expert)
    assert per_expert_config["target_modules"] == ATTENTION + [gate, up, down, "gate"]
    assert "target_parameters" not in per_expert_config and per_expert_config["r"] == R
    # peft converts the per-expert layout to its fused one on load (transformers 4 adapters)
    loaded = _load(base, per_expert, per_expert_config, str(tmp_path / "per_expert"))
    diff = (_logits(loaded) - _logits(adapted)).abs().max().item()
    print(f"max |logit difference| per-expert layout vs original PEFT ({model_type}): {diff:.3g}")
    assert diff <= 1e-5
    _assert_same_deltas(_megatron_deltas(full, cfg, arch), _peft_merged_deltas(base, loaded))
    again, again_cfg = megatron_from_peft(per_expert, per_expert_config, arch)
    _equal(again, full)
    assert again_cfg == cfg
    _equal(peft_from_megatron(again, again_cfg, arch)[0], tensors)


def _random_full(names_shapes, seed, zero_column=None):
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(shape, generator=g) * 0.3 for k, shape in names_shapes.items()}
    if zero_column is not None:
        for k, t in out.items():
            if k.endswith("lora_B"):
                t[:, zero_column] = 0
    return out


@pytest.mark.parametrize("kind", ["trained", "unused_component", "per_projection"])
def test_megatron_adapters_export_in_both_layouts_with_their_update(case, kind, tmp_path):
    """A Megatron full adapter (random, rank 4, one alpha) -> PEFT -> peft's merged weights."""
    _export_megatron_adapter(case, kind, tmp_path)


def test_a_shared_expert_adapter_exports_as_per_expert_copies(moe_case, tmp_path):
    _export_megatron_adapter(moe_case, "shared", tmp_path)


def _export_megatron_adapter(case, kind, tmp_path):
    model_type, base, arch, _, tensors, config = case
    full, cfg = megatron_from_peft(tensors, config, arch)
    rank = 4
    shapes = {k: (v.shape[0], rank) if k.endswith("lora_B") else ((2 if kind == "per_projection" and k.endswith(
        ("linear_qkv.lora_A", "linear_fc1.lora_A")) else 1) * rank, v.shape[1]) for k, v in full.items()}
    if kind == "per_projection":
        shapes = {k: v for k, v in shapes.items() if "router" not in k}
        shapes.update({k: (3 * rank, v[1]) for k, v in shapes.items() if k.endswith("linear_qkv.lora_A")})
    megatron = _random_full(shapes, seed=11, zero_column=2 if kind == "unused_component" else None)
    if kind == "shared":  # expert_adapters="shared": every expert's keys hold the layer's one adapter
        for k in megatron:
            if ".local_experts." in k:
                parts = k.split(".")
                megatron[k] = megatron[".".join(parts[:6] + ["0"] + parts[7:])]
    targets = cfg.target_modules if kind != "per_projection" else tuple(t for t in cfg.target_modules if t != "router")
    mcfg = LoRAConfig(rank=rank, alpha=8, target_modules=targets, per_projection=kind == "per_projection", dropout=0.1,
                      expert_adapters="shared" if kind == "shared" else "per_expert")
    want = _megatron_deltas(megatron, mcfg, arch)
    layouts = ["fused", "per_expert"] if model_type != "qwen3" else ["fused"]
    for layout in layouts:
        exported, exported_config = peft_from_megatron(megatron, mcfg, arch, expert_layout=layout)
        loaded = _load(base, exported, exported_config, str(tmp_path / layout))
        _assert_same_deltas(want, _peft_merged_deltas(base, loaded), atol=2e-6)
        # one r: the largest count of used components over every PEFT pair, the rest zero-padded
        r_expected = {"trained": rank, "unused_component": rank - 1, "shared": rank,
                      "per_projection": 2 * rank if layout == "fused" and model_type != "qwen3" else rank}[kind]
        assert exported_config["r"] == r_expected, layout
        s = exported_config["lora_alpha"] / exported_config["r"]
        assert s == pytest.approx(mcfg.scaling, rel=1e-15) and not exported_config["use_rslora"]
        # peft refuses dropout on parameter LoRA (its form of the experts, per-expert ones included)
        assert exported_config["lora_dropout"] == (0.1 if model_type == "qwen3" else 0.0)
        if kind == "shared" and layout == "fused":  # each expert's block equals expert 0's
            a = exported["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"]
            assert all(torch.equal(a[e * rank:(e + 1) * rank], a[:rank]) for e in range(4))


# ------------------------------------------------------------------------- partial adapters

@pytest.mark.parametrize("parameter", EXPERTS)
def test_one_fused_parameter_alone_is_read_by_its_key(moe_case, parameter, tmp_path):
    """With one targeted parameter its factors are ``mlp.experts.lora_A|B`` (no base_layer),
    whichever it is; a layer without expert factors gets zero updates."""
    _, base, arch, _, _, _ = moe_case
    adapted = _peft_model(base, target_modules=(), target_parameters=[parameter])
    tensors, config = _saved(adapted, str(tmp_path / "peft"))
    assert sorted(k.split("layers.1.")[1] for k in tensors if ".layers.1." in k) == \
        ["mlp.experts.lora_A.weight", "mlp.experts.lora_B.weight"]
    full, cfg = megatron_from_peft(tensors, config, arch)
    _assert_same_deltas(_megatron_deltas(full, cfg, arch), _peft_merged_deltas(base, adapted))
    assert cfg.target_modules == ("linear_fc1" if "gate_up" in parameter else "linear_fc2",)
    back, back_config = peft_from_megatron(full, cfg, arch)
    _equal(back, tensors)
    assert (back_config["target_modules"], back_config["target_parameters"]) == ([], [parameter])
    skipped = {k: v for k, v in tensors.items() if ".layers.0." not in k}
    full, cfg = megatron_from_peft(skipped, config, arch)
    assert not any(t.any() for k, t in full.items() if k.startswith("decoder.layers.0.") and k.endswith("lora_B"))
    want = {k: v for k, v in _peft_merged_deltas(base, adapted).items() if ".layers.1." in k}
    _assert_same_deltas(_megatron_deltas(full, cfg, arch), want)


def test_experts_a_per_expert_adapter_leaves_out_get_zero_updates(moe_case):
    model_type, base, arch, adapted, tensors, config = moe_case
    full, cfg = megatron_from_peft(tensors, config, arch)
    per_expert, per_expert_config = peft_from_megatron(full, cfg, arch, expert_layout="per_expert")
    missing = {k: v for k, v in per_expert.items() if ".layers.1." not in k or ".experts.2." not in k}
    assert len(per_expert) - len(missing) == 6  # gate, up, down of one expert
    got, got_cfg = megatron_from_peft(missing, per_expert_config, arch)
    for k in full:
        if ".layers.1.mlp.experts.local_experts.2." in k and k.endswith("lora_B"):
            assert not got[k].any()
        elif ".layers.1.mlp.experts.local_experts.2." not in k:
            assert torch.equal(got[k], full[k]), k


# ------------------------------------------------------------------------------------ errors

def _refused(call, *messages):
    with pytest.raises(ConversionError) as err:
        call()
    text = str(err.value)
    assert "\n" not in text and all(m in text for m in messages), text


def test_target_parameters_other_than_experts_and_router_are_refused_by_name(moe_case):
    _, _, arch, _, tensors, config = moe_case
    for bad in ("self_attn.q_proj.weight", "mlp.experts.up_proj"):
        _refused(lambda: megatron_from_peft(tensors, dict(config, target_parameters=[*EXPERTS, bad]), arch),
                 f"target_parameters ['{bad}']", "mlp.experts.gate_up_proj")
    dense = _arch(_hf("qwen3"))
    _refused(lambda: megatron_from_peft(tensors, config, dense), "adapt experts", "has none", "qwen3")


def test_expert_factors_that_do_not_fit_are_refused(moe_case):
    _, _, arch, _, tensors, config = moe_case
    inner = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"
    wrong = dict(tensors, **{inner: tensors[inner][:-1]})
    _refused(lambda: megatron_from_peft(wrong, config, arch), inner, "(gate_up_proj)", "expected (8, 32)",
             "r=2 x 4 experts")
    half = {k: v for k, v in tensors.items() if k != inner}
    _refused(lambda: megatron_from_peft(half, config, arch), "layer 1 mlp.experts.gate_up_proj has lora_B but not both")
    _refused(lambda: megatron_from_peft(tensors, dict(config, target_parameters=[ROUTER]), arch),
             "fused expert factor", "target_parameters")
    per_expert = peft_from_megatron(*megatron_from_peft(tensors, config, arch), arch, expert_layout="per_expert")[0]
    mixed = dict(tensors, **{k: v for k, v in per_expert.items() if ".layers.1." in k and ".experts." in k})
    _refused(lambda: megatron_from_peft(mixed, config, arch), "layer 1 has both fused", "one layout per adapter")
    extra = {k.replace(".experts.3.", ".experts.4."): v for k, v in per_expert.items() if ".experts.3." in k}
    _refused(lambda: megatron_from_peft(dict(per_expert, **extra), config, arch), "expert 4", "has 4 experts")


def test_the_router_cannot_import_per_projection_or_above_its_size(moe_case, tmp_path):
    _, base, arch, adapted, tensors, config = moe_case
    _refused(lambda: megatron_from_peft(tensors, config, arch, per_projection=True),
             "adapts the router", "without --per-projection")
    distinct = _peft_model(base, seed=9)  # q/k/v A's distinct: rank 3r = 6 > 4 experts
    tensors, config = _saved(distinct, str(tmp_path / "peft"))
    _refused(lambda: megatron_from_peft(tensors, config, arch), "rank 6 (r=2, distinct A's stacked)",
             "mlp.router", "smaller side is 4", "or without the router")


def test_export_refuses_unknown_targets_and_layouts(moe_case):
    _, _, arch, _, tensors, config = moe_case
    full, cfg = megatron_from_peft(tensors, config, arch)
    shared = LoRAConfig(rank=cfg.rank, alpha=cfg.alpha, target_modules=("shared_experts.linear_fc1",))
    _refused(lambda: peft_from_megatron(full, shared, arch), "['shared_experts.linear_fc1']", "exportable targets",
             "experts.linear_fc1")
    with pytest.raises(ValueError, match="expert_layout must be one of"):
        peft_from_megatron(full, cfg, arch, expert_layout="per-expert")
    _refused(lambda: peft_from_megatron(full, cfg, _arch(_hf("qwen3"))), "['router']", "no qwen3 projection")


def test_target_parameters_read_in_every_spelling_peft_matches(moe_case):
    """peft matches a target parameter by suffix; its own v4 -> v5 conversion writes bare names."""
    _, _, arch, _, tensors, config = moe_case
    want = megatron_from_peft(tensors, config, arch)
    for spelling in (["gate_up_proj", "down_proj", "gate.weight"], ["experts.down_proj", "experts.gate_up_proj",
                                                                     "mlp.gate.weight"]):
        got = megatron_from_peft(tensors, dict(config, target_parameters=spelling), arch)
        _equal(got[0], want[0])
        assert got[1] == want[1]
