"""LoRA+: B steps at ``ratio`` times A's rate, in a custom loop and through Megatron's optimizer.

Reference: the same model trained with one rate (ratio 1). Adam's first update is ``lr`` times a
quantity that does not depend on ``lr`` (m / (sqrt(v) + eps) of the same gradient), so after one
step at ratio k: A moved exactly as at ratio 1 (bitwise), B moved k times as far (to rounding).
Through Megatron's ``get_megatron_optimizer`` + ``OptimizerParamScheduler`` the B groups' rate is
k times the A groups' at every step of a warmup + linear decay schedule, on every release's API
(``config_overrides`` from 0.16, ``scale_lr_cond`` / ``lr_mult`` on 0.13).
"""

import pytest
import torch

from tests.distributed import gpt_cases as G
from tests.distributed.launcher import run_distributed

RATIO = 4.0
LR = 1e-2


def _factors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _custom_loop_step(full_state, ratio):
    from megatron_lora.core.lora_plus import lora_plus_param_groups

    model = G.build_lora_gpt(full_state)
    before = _factors(model)
    groups = lora_plus_param_groups(model, lr=LR, ratio=ratio, weight_decay=0.01)
    opt = torch.optim.AdamW(groups)
    inputs, labels = G.batches(1)[0]
    G._loss(model, inputs, labels).backward()
    opt.step()
    after = _factors(model)
    return {n: after[n] - before[n] for n in before}, [g["lr"] for g in groups], \
        [sorted(n for n, p in model.named_parameters() if any(p is q for q in g["params"])) for g in groups]


def _megatron_schedule(full_state, ratio):
    """Group learning rates per step (warmup 2, linear decay to min_lr over 6) and the factor
    updates of step 1, through Megatron's DDP, optimizer and scheduler. Step 0 runs at the warmup's
    rate 0: it moves nothing but fills Adam's moments, the same in every run."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_lora.core.lora_plus import megatron_optimizer_kwargs

    model = G.build_lora_gpt(full_state)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
    config = OptimizerConfig(optimizer="adam", lr=LR, min_lr=LR / 10, weight_decay=0.01, clip_grad=0.0)
    plus = megatron_optimizer_kwargs(config, ratio) if ratio is not None else {}
    opt = get_megatron_optimizer(config, [ddp], **plus)
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=LR, min_lr=LR / 10, lr_warmup_steps=2,
                                    lr_decay_steps=6, lr_decay_style="linear", start_wd=0.01, end_wd=0.01,
                                    wd_incr_steps=6, wd_incr_style="constant")
    b_ids = {id(p) for n, p in model.named_parameters() if n.endswith("lora_B")}
    first_delta, rates = None, []
    for step, (inputs, labels) in enumerate(G.batches(6)):
        before = _factors(model)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        G._loss(ddp, inputs, labels).backward()
        opt.step()
        rates.append(sorted({(any(id(p) in b_ids for p in g["params"]), g["lr"]) for g in opt.param_groups
                             if g["params"]}))
        sched.step(1)
        if step == 1:
            after = _factors(model)
            first_delta = {n: after[n] - before[n] for n in before}
    return first_delta, rates


def custom_worker(full_state):
    return {ratio: _custom_loop_step(full_state, ratio) for ratio in (1.0, RATIO)}


def megatron_worker(full_state):
    return {ratio: _megatron_schedule(full_state, ratio) for ratio in (None, RATIO)}


@pytest.fixture(scope="module")
def base_state():
    return G.base_state()


def _assert_b_moves_ratio_times(plain, plus):
    assert set(plain) == set(plus) and any(k.endswith("lora_B") for k in plain)
    for name, delta in plain.items():
        assert torch.count_nonzero(delta), name
        if name.endswith("lora_B"):
            torch.testing.assert_close(plus[name], RATIO * delta, rtol=1e-5, atol=0)
        else:
            assert torch.equal(plus[name], delta), name


def test_custom_loop_param_groups(base_state):
    for rank in run_distributed(custom_worker, 2, base_state, tp=2):
        (plain, _, _), (plus, rates, members) = rank[1.0], rank[RATIO]
        assert rates == [LR, RATIO * LR]
        assert members[0] and all(n.endswith("lora_A") for n in members[0])
        assert members[1] and all(n.endswith("lora_B") for n in members[1])
        _assert_b_moves_ratio_times(plain, plus)


def test_megatron_optimizer_scales_b_at_every_step(base_state):
    for rank in run_distributed(megatron_worker, 2, base_state, tp=2):
        (plain, plain_rates), (plus, plus_rates) = rank[None], rank[RATIO]
        _assert_b_moves_ratio_times(plain, plus)
        for step, (one_rate, rates) in enumerate(zip(plain_rates, plus_rates)):
            assert len({lr for _, lr in one_rate}) == 1, one_rate  # one rate without LoRA+
            (base_lr,) = {lr for _, lr in one_rate}
            a_rates = {lr for is_b, lr in rates if not is_b}
            b_rates = {lr for is_b, lr in rates if is_b}
            assert a_rates == {base_lr} and b_rates and \
                all(abs(lr - RATIO * base_lr) <= 1e-12 * RATIO * LR for lr in b_rates), (step, rates)
        assert plain_rates[0] != plain_rates[-1]  # the schedule moved: warmup, then decay


def test_refuses_trainable_non_adapter_parameter():
    from megatron_lora.core.lora_plus import lora_plus_param_groups

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="weight is trainable but not an adapter parameter"):
        lora_plus_param_groups(model, lr=1.0, ratio=16)
    with pytest.raises(ValueError, match="ratio must be a positive number"):
        lora_plus_param_groups(model, lr=1.0, ratio=0)
