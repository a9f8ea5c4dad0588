"""End-to-end runs of scripts/pretrain_gpt_lora.py (issue 4's acceptance).

Every LoRA run starts from ONE base checkpoint pretrained by the script itself at TP=1, so the
layouts differ only in how the same computation is split (docs/design.md §11).
"""

import glob
import math
import os
import re

import pytest
import torch

from megatron_lora.core.layers import is_lora_key
from tests.distributed import script_runs as S
from tests.distributed.launcher import run_distributed

TRAIN = S.TRAIN_FLAGS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrain")


@pytest.fixture(scope="module")
def data(workdir):
    return S.make_dataset(str(workdir))


@pytest.fixture(scope="module")
def base(workdir, data):
    """A base model pretrained 6 iterations at TP=1 (also checks eval and TensorBoard output)."""
    save, tb = workdir / "base", workdir / "tb"
    run = S.run_script([*S.MODEL_FLAGS, *TRAIN, "--train-iters", "6", "--data-path", data,
                        "--eval-iters", "2", "--eval-interval", "3",
                        "--save", save, "--tensorboard-dir", tb])
    losses = S.losses(run.stdout)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1], run.stdout
    assert "validation lm loss at iteration 3" in run.stdout and "tokens/s" in run.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert glob.glob(str(tb / "events.out.tfevents.*")), "no TensorBoard event file"
    return str(save)


def lora_run(workdir, data, base, name, nproc=1, extra=(), iters=10):
    save = workdir / name
    run = S.run_script([*S.MODEL_FLAGS, *TRAIN, *S.LORA_FLAGS, "--train-iters", iters,
                        "--data-path", data, "--pretrained-checkpoint", base, "--save", save,
                        *extra], nproc=nproc)
    return run, save


@pytest.fixture(scope="module")
def tp1(workdir, data, base):
    run, save = lora_run(workdir, data, base, "lora_tp1")
    return S.losses(run.stdout), str(save)


LAYOUTS = {
    "TP=2": ["--tensor-model-parallel-size", "2"],
    "PP=2": ["--pipeline-model-parallel-size", "2"],
    "DP=2": [],
    "DP=2 distributed optimizer": ["--use-distributed-optimizer"],
    "TP=2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
}


def _adapter(save):
    from megatron_lora.core.checkpoint.adapter import read_full_adapter

    return read_full_adapter(os.path.join(save, "adapter.safetensors"))[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_layout_matches_tp1(workdir, data, base, tp1, layout):
    ref_losses, ref_save = tp1
    run, save = lora_run(workdir, data, base, f"lora_{layout}".replace(" ", "_").replace("=", ""),
                         nproc=2, extra=LAYOUTS[layout])
    got = S.losses(run.stdout)
    assert sorted(got) == list(range(1, 11)), run.stdout
    for it in got:
        assert math.isclose(got[it], ref_losses[it], rel_tol=2e-5), (it, got[it], ref_losses[it])
    ref, mine = _adapter(ref_save), _adapter(str(save))
    assert sorted(ref) == sorted(mine) and len(ref) == 4 * 2 * 2
    for name in ref:
        assert ref[name].abs().max() > 0, name  # every factor trained (B starts at 0)
        # Adam divides by sqrt(v): elements whose gradient is ~0 turn fp32 reduction-order noise
        # into lr-sized steps, so the bound is in units of lr (1e-2 x 10 steps), not 1e-7.
        torch.testing.assert_close(mine[name], ref[name], rtol=1e-3, atol=1e-4)


def test_resumed_run_reproduces_uninterrupted_losses(workdir, data, base):
    """Interrupted at 4 (--exit-interval), resumed with --load: identical losses and adapter.

    Dropout is on (model and LoRA), so the RNG state has to come back too."""
    noisy = ["--tensor-model-parallel-size", "2", "--hidden-dropout", "0.1", "--lora-dropout", "0.1",
             "--lr-decay-style", "cosine", "--lr-warmup-iters", "2"]
    full, full_save = lora_run(workdir, data, base, "resume_full", nproc=2, extra=noisy, iters=8)
    first, part_save = lora_run(workdir, data, base, "resume_part", nproc=2, extra=[*noisy, "--exit-interval", "4"],
                                iters=8)
    assert sorted(S.losses(first.stdout)) == [1, 2, 3, 4] and "exiting at iteration 4" in first.stdout
    second, _ = lora_run(workdir, data, base, "resume_part", nproc=2, extra=[*noisy, "--load", part_save], iters=8)
    assert "resumed from" in second.stdout and "at iteration 4" in second.stdout
    expected = S.losses(full.stdout)
    assert {**S.losses(first.stdout), **S.losses(second.stdout)} == expected  # bitwise
    ref, mine = _adapter(str(full_save)), _adapter(str(part_save))
    assert all(torch.equal(ref[k], mine[k]) for k in ref)


@pytest.fixture(scope="module")
def stopped_at_tp2(workdir, data, base):
    """A LoRA run at TP=2 stopped by --exit-interval 4: its --save directory."""
    run, save = lora_run(workdir, data, base, "stopped_tp2", nproc=2,
                         extra=["--tensor-model-parallel-size", "2", "--exit-interval", "4"])
    assert "exiting at iteration 4" in run.stdout
    return str(save)


@pytest.mark.parametrize("layout, nproc", [("TP=1", 1), ("PP=2", 2)])
def test_resume_at_another_layout_follows_the_uninterrupted_losses(workdir, data, base, tp1, stopped_at_tp2,
                                                                   layout, nproc):
    """Saved at TP=2, resumed at TP=1 or PP=2: adapter and optimizer state reshard, RNG state is
    dropped with a warning (dropout is off, so nothing random is lost), and the losses follow the
    uninterrupted TP=1 run within the layout tolerance."""
    extra = {"TP=1": [], "PP=2": ["--pipeline-model-parallel-size", "2"]}[layout]
    run, _ = lora_run(workdir, data, base, f"resumed_{layout.replace('=', '')}", nproc=nproc,
                      extra=[*extra, "--load", stopped_at_tp2])
    assert "at iteration 4" in run.stdout and "holds RNG state of another layout" in run.stdout, run.stdout
    got, ref = S.losses(run.stdout), tp1[0]
    assert sorted(got) == list(range(5, 11)), run.stdout
    for it in got:
        assert math.isclose(got[it], ref[it], rel_tol=2e-5), (it, got[it], ref[it])


def test_run_saved_without_optimizer_and_rng_state_resumes(workdir, data, base):
    part = ["--exit-interval", "2", "--no-save-optim", "--no-save-rng"]
    _, save = lora_run(workdir, data, base, "lean_save", extra=part, iters=4)
    run, _ = lora_run(workdir, data, base, "lean_save", extra=["--load", save], iters=4)
    assert "at iteration 2" in run.stdout and sorted(S.losses(run.stdout)) == [3, 4], run.stdout
    assert "holds no optimizer state" in run.stdout and "holds no RNG state" in run.stdout


def test_resume_with_another_batch_size_reads_on_from_the_consumed_samples(workdir, data, base):
    """Stopped after 2 iterations of 4 samples; resumed with 2 samples per iteration: the data
    continues at sample 8 (the checkpoint's count), not at iteration x the new batch size."""
    _, save = lora_run(workdir, data, base, "batch_change", extra=["--exit-interval", "2"], iters=4)
    run, _ = lora_run(workdir, data, base, "batch_change", iters=4,
                      extra=["--load", save, "--micro-batch-size", "1", "--global-batch-size", "2"])
    assert "(8 samples consumed)" in run.stdout, run.stdout
    consumed = dict(re.findall(r"^iteration\s+(\d+)/\s*\d+ \| consumed samples\s+(\d+)", run.stdout, re.M))
    assert consumed == {"3": "10", "4": "12"}, run.stdout


def test_adapter_resumed_without_its_base_is_refused(workdir, data, base, stopped_at_tp2):
    run = S.run_script([*S.MODEL_FLAGS, *TRAIN, *S.LORA_FLAGS, "--train-iters", "10", "--data-path", data,
                        "--tensor-model-parallel-size", "2", "--load", stopped_at_tp2, "--save", stopped_at_tp2],
                       nproc=2, check=False)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode != 0 and len(lines) == 1, run.stderr
    assert f"trained on the base {base}, this run has no --pretrained-checkpoint" in lines[0], lines[0]
    assert f"pass --pretrained-checkpoint {base}" in lines[0]


def test_precision_change_on_resume_says_what_differs(workdir, data, base, tp1):
    save = tp1[1]
    before = _files(save)
    run = S.run_script([*S.MODEL_FLAGS, *TRAIN, *S.LORA_FLAGS, "--train-iters", "12", "--data-path", data,
                        "--pretrained-checkpoint", base, "--load", save, "--save", workdir / "bf16_resume",
                        "--bf16"], check=False)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode != 0 and len(lines) == 1, run.stderr
    assert "saved with float32 parameters, this run has bfloat16" in lines[0] and "--no-load-optim" in lines[0]
    assert _files(save) == before


def _merged_worker(flags, base, save, merged):
    from megatron_lora import apply_lora
    from megatron_lora.core.checkpoint.adapter import load_full_adapter
    from megatron_lora.training.model_checkpoint import load_model
    from megatron_lora.training.pretrain_args import parse_args, validate_args
    from megatron_lora.training.loop import gpt_stage_from_args

    args = validate_args(parse_args(flags), world_size=2)

    def stage(lora):
        torch.manual_seed(123)  # any init: every weight is loaded below
        return gpt_stage_from_args(args, lora)

    lora_model = stage(args.lora)
    load_model(lora_model, base)
    apply_lora(lora_model, args.lora)
    load_full_adapter(lora_model, os.path.join(save, "adapter.safetensors"))
    plain = stage(None)
    load_model(plain, merged)
    base_model = stage(None)
    load_model(base_model, base)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        out = [m(tokens, positions, None) for m in (lora_model, plain, base_model)]
    frozen_same = all(torch.equal(p, q) for (n, p), (_, q) in zip(plain.named_parameters(), base_model.named_parameters())
                      if not n.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")))
    return dict(lora_vs_merged=(out[0] - out[1]).abs().max().item(), lora_vs_base=(out[0] - out[2]).abs().max().item(),
                frozen_same=frozen_same)


def test_finetune_saves_only_the_adapter_and_merged_checkpoint_equals_lora(workdir, data, base):
    merged = workdir / "merged"
    run, save = lora_run(workdir, data, base, "finetune", nproc=2, iters=6,
                         extra=["--tensor-model-parallel-size", "2", "--lora-save-merged", merged])
    assert "saved the merged model" in run.stdout
    # --save holds the adapter only: every tensor in its dist checkpoint is a LoRA factor, or its
    # optimizer state / RNG state, besides Megatron's own common state (megatron-core 0.19 keeps it
    # in the checkpoint as the object "common_state/...", earlier releases in common.pt).
    import pickle

    with open(save / "iter_0000006" / ".metadata", "rb") as f:
        keys = list(pickle.load(f).state_dict_metadata)
    model_keys = [k for k in keys if not k.startswith(("optimizer.", "rng_state.", "common_state/"))]
    assert model_keys and all(is_lora_key(k) for k in model_keys), model_keys
    assert all(".lora_" in k for k in keys if k.startswith("optimizer.")), keys
    flags = [*S.MODEL_FLAGS, *TRAIN, *S.LORA_FLAGS, "--train-iters", "6", "--data-path", data,
             "--tensor-model-parallel-size", "2"]
    results = run_distributed(_merged_worker, 2, flags, base, str(save), str(merged), tp=2)
    for r in results:
        assert r["lora_vs_merged"] < 1e-4, r
        assert r["lora_vs_base"] > 1e-3, r  # the adapter changed the model
        assert r["frozen_same"], r  # embeddings and norms are the base's: only LoRA trained


BAD_INPUTS = {
    "missing data path": (["--data-path", "/nonexistent/corpus"], 1, "/nonexistent/corpus"),
    "TP does not divide heads": (["--tensor-model-parallel-size", "3"], 3, "--num-attention-heads 4"),
    "unknown LoRA target": (["--lora-target-modules", "linear_qkv", "q_proj"], 1, "q_proj"),
    "SP with TP=1": (["--sequence-parallel"], 1, "--sequence-parallel"),
    "base with other sizes": (["--hidden-size", "64", "--ffn-hidden-size", "128"], 1, "--hidden-size"),
    "LoRA rank above the layer sizes": (["--lora-rank", "1000000000"], 1, "--lora-rank 1000000000 exceeds"),
    "--lora-load of a directory": (["--lora-load", "/tmp"], 1, "--lora-load /tmp is a directory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(workdir, data, base, case):
    flags, nproc, needle = BAD_INPUTS[case]
    save = workdir / f"bad_{case.replace(' ', '_')}"
    run = S.run_script([*S.MODEL_FLAGS, *TRAIN, *S.LORA_FLAGS, "--train-iters", "2", "--data-path", data,
                        "--pretrained-checkpoint", base, "--save", save, *flags], nproc=nproc, check=False)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert not save.exists()


def _files(root) -> dict:
    """{relative path: bytes} of every file under ``root``: what a refused run must leave alone."""
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


# name: (the run's flags besides the model / train / data flags, needle in the one error line,
#        the directory that must stay byte for byte as it was)
CHECKPOINT_MISTAKES = {
    "LoRA --save at the base's directory": (
        lambda w, base, lora: [*S.LORA_FLAGS, "--pretrained-checkpoint", base, "--save", base],
        "holds full-model checkpoints; this run writes LoRA adapter checkpoints", "base"),
    "resume that forgets --lora-rank": (
        lambda w, base, lora: ["--load", lora, "--save", lora],
        "holds LoRA adapter checkpoints; this run writes full-model checkpoints and would replace them", "lora"),
    "LoRA --save holding another LoRA config": (
        lambda w, base, lora: ["--lora-rank", "8", *S.LORA_FLAGS[2:], "--pretrained-checkpoint", base,
                               "--save", lora],
        "another LoRA config (--lora-rank: checkpoint 4, this run 8)", "lora"),
    "--save holding another model": (
        lambda w, base, lora: ["--hidden-size", "64", "--ffn-hidden-size", "128", "--save", base],
        "another model (--hidden-size: checkpoint 32, this run 64", "base"),
    "LoRA resume from the base's directory": (
        lambda w, base, lora: [*S.LORA_FLAGS, "--pretrained-checkpoint", base, "--load", base,
                               "--save", w / "mistyped"],
        "holds full-model checkpoints; this run resumes LoRA adapter checkpoints", "base"),
    "mistyped --load": (
        lambda w, base, lora: [*S.LORA_FLAGS, "--pretrained-checkpoint", base, "--load", w / "lora_tp_1",
                               "--save", w / "mistyped"],
        "lora_tp_1: no such directory", "lora"),
    "--load of a directory without checkpoints": (
        lambda w, base, lora: [*S.LORA_FLAGS, "--pretrained-checkpoint", base, "--load", w / "tb",
                               "--save", w / "no_ckpt"],
        "holds no checkpoint", "lora"),
    "--save naming a file": (
        lambda w, base, lora: [*S.LORA_FLAGS, "--pretrained-checkpoint", base,
                               "--save", os.path.join(base, "latest_checkpointed_iteration.txt")],
        "is a file, not a directory", "base"),
    "--save where nothing can be written": (
        lambda w, base, lora: [*S.LORA_FLAGS, "--pretrained-checkpoint", base, "--save", "/proc/megatron_lora"],
        "--save /proc/megatron_lora: cannot write checkpoints under /proc", "base"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_MISTAKES))
def test_checkpoint_mistakes_fail_in_one_line_and_lose_nothing(workdir, data, base, tp1, case):
    """No run may replace a checkpoint of another kind, LoRA config or model, resume from a
    directory that holds nothing it can resume, or find out after training that --save is unusable."""
    flags, needle, keep = CHECKPOINT_MISTAKES[case]
    kept = {"base": base, "lora": tp1[1]}[keep]
    before = _files(kept)
    run = S.run_script([*S.MODEL_FLAGS, *TRAIN, "--train-iters", "2", "--data-path", data,
                        *flags(workdir, base, tp1[1])], check=False)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in run.stdout + run.stderr
    assert _files(kept) == before
    assert not (workdir / "mistyped").exists() and not (workdir / "no_ckpt").exists()


def test_first_launch_that_resumes_where_it_saves_starts_fresh(workdir, data, base):
    """--load naming --save before anything was saved there (the Slurm requeue pattern)."""
    save = workdir / "resume_or_start"
    run = S.run_script([*S.MODEL_FLAGS, *TRAIN, *S.LORA_FLAGS, "--train-iters", "2", "--data-path", data,
                        "--pretrained-checkpoint", base, "--save", save, "--load", save])
    assert (save / "latest_adapter_iteration.txt").read_text() == "2", run.stdout


@pytest.mark.parametrize("precision", ("--bf16", "--fp16"))
def test_half_precision_lora_run_tracks_the_fp32_trajectory(workdir, data, base, tp1, precision):
    """--bf16 / --fp16 (Float16Module + Megatron's mixed-precision optimizer, fp32 main params and
    grad reduction; dynamic loss scaling for fp16) at TP=2: the fp32 path, plus half-precision noise."""
    ref_losses, _ = tp1
    run, save = lora_run(workdir, data, base, f"lora_{precision[2:]}", nproc=2,
                         extra=["--tensor-model-parallel-size", "2", precision])
    got = S.losses(run.stdout)
    assert sorted(got) == list(range(1, 11)), run.stdout
    for it in got:
        assert math.isclose(got[it], ref_losses[it], rel_tol=2e-2), (it, got[it], ref_losses[it])
    assert "replicated LoRA factors bitwise identical across TP ranks: 8/8" in run.stdout


def test_lora_plus_run_resumes_bitwise(workdir, data, base, tp1):
    """--lora-plus-ratio: a run interrupted at 3 and resumed follows the uninterrupted one
    bitwise (the B groups' rates come back with the optimizer), and differs from plain LoRA."""
    plus = ["--lora-plus-ratio", "4", "--lr-warmup-iters", "2"]
    full, _ = lora_run(workdir, data, base, "plus_full", extra=plus, iters=6)
    first, part_save = lora_run(workdir, data, base, "plus_part", extra=[*plus, "--exit-interval", "3"], iters=6)
    second, _ = lora_run(workdir, data, base, "plus_part", extra=[*plus, "--load", part_save], iters=6)
    expected = S.losses(full.stdout)
    assert sorted(expected) == list(range(1, 7))
    assert {**S.losses(first.stdout), **S.losses(second.stdout)} == expected
    plain, _ = lora_run(workdir, data, base, "plus_plain", extra=["--lr-warmup-iters", "2"], iters=6)
    assert S.losses(plain.stdout)[4] != expected[4]  # B's rate changed the trajectory
    other = S.run_script([*S.MODEL_FLAGS, *TRAIN, *S.LORA_FLAGS, "--train-iters", 6, "--data-path", data,
                          "--pretrained-checkpoint", base, "--save", part_save, "--load", part_save,
                          "--lora-plus-ratio", "8", "--lr-warmup-iters", "2"], check=False)
    assert other.returncode != 0 and "Traceback" not in other.stderr, other.stderr
    assert "was saved with --lora-plus-ratio 4, this run is with --lora-plus-ratio 8" in other.stderr, other.stderr
