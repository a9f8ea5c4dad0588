"""GPT pretraining and LoRA fine-tuning on Megatron-Core, with Megatron-LM's flag names.

    # N local ranks (CPU + gloo when there is no GPU), flags checked once before any rank starts:
    python scripts/pretrain_gpt_lora.py --nproc-per-node 2 --tensor-model-parallel-size 2 \
        --num-layers 2 --hidden-size 128 --num-attention-heads 8 --seq-length 64 \
        --micro-batch-size 8 --train-iters 100 --lr 3e-3 --data-path /data/my_text_document \
        --pretrained-checkpoint /ckpt/base --lora-rank 8 --save /ckpt/lora
    # or under torchrun / srun, as Megatron-LM's pretrain_gpt.py:
    torchrun --nproc-per-node 2 scripts/pretrain_gpt_lora.py ...
    # on Slurm (preemption-safe: saves on SIGUSR1 and requeues; see scripts/slurm/README.md):
    sbatch scripts/slurm/pretrain_gpt_lora.sbatch ...

Without --lora-rank it pretrains (or fine-tunes) the whole model; with it, only the adapter
trains and --save holds only the adapter. The logic lives in megatron_lora.training.loop.
"""

import os
import sys


def main(argv=None) -> int:
    from megatron_lora.training.quiet import quiet_known_messages

    quiet_known_messages()
    from megatron_lora.training import launch
    from megatron_lora.core.checkpoint.errors import CheckpointError
    from megatron_lora.training.data import DataError
    from megatron_lora.training.pretrain_args import UsageError, parse_args, validate_args

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    world = launch.world_size() if launch.launched() else (args.nproc_per_node or 1)
    try:
        validate_args(args, world)
    except UsageError as err:
        if not launch.launched() or launch.rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if not launch.launched():
        if world > 1:
            return launch.run_local_ranks(world, os.path.abspath(__file__), argv)
        launch.set_single_process_env()
    from megatron_lora.training.loop import pretrain

    try:
        pretrain(args)
    except (UsageError, CheckpointError, DataError, FloatingPointError) as err:
        launch.report_error(str(err))
        return 2 if isinstance(err, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
