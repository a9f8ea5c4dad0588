"""Convert between Hugging Face / PEFT checkpoints and Megatron-Core (megatron_lora) checkpoints.

    # HF Llama / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral (safetensors) -> Megatron dist checkpoint
    # + model_args.json + model_flags.txt
    python scripts/convert_checkpoint.py hf-to-megatron --hf-dir Llama-3.2-1B --output ckpt/base \
        --target-tensor-parallel-size 2
    # PEFT adapter -> full adapter for pretrain_gpt_lora.py --lora-load (any TP)
    python scripts/convert_checkpoint.py peft-to-megatron --peft-dir my-peft --base ckpt/base \
        --output ckpt/imported.safetensors
    # trained adapter (LoRA --save dir, dist checkpoint or .safetensors) -> PEFT directory
    python scripts/convert_checkpoint.py megatron-to-peft --adapter ckpt/lora --base ckpt/base --output my-peft
    # base + adapter folded -> Megatron checkpoint, or a Hugging Face one transformers loads
    python scripts/convert_checkpoint.py merge --base ckpt/base --adapter ckpt/lora --to hf \
        --hf-config-dir Llama-3.2-1B --output merged-hf
    # a Megatron base checkpoint (e.g. pretrained with pretrain_gpt_lora.py) -> Hugging Face
    python scripts/convert_checkpoint.py megatron-to-hf --base ckpt/base --output base-hf

Conversions run in one process on CPU (or one GPU); the logic lives in megatron_lora.hf.
Bad input exits with one ``error: ...`` line (status 2) before anything is written.
"""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    base_help = ("The base model: a Megatron checkpoint written by hf-to-megatron / pretrain_gpt_lora.py "
                 "(it has model_args.json), a model_args.json, or the Hugging Face model directory.")
    dtype = dict(choices=("float32", "bfloat16"), default="float32", help="dtype of the written weights.")

    c = sub.add_parser("hf-to-megatron", help="Hugging Face base weights -> Megatron dist checkpoint.")
    c.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + safetensors).")
    c.add_argument("--output", required=True, help="New directory for the Megatron checkpoint.")
    c.add_argument("--target-tensor-parallel-size", type=int, default=1,
                   help="TP size you will load at: checked now (heads, query groups, ffn, vocab divide).")
    c.add_argument("--target-pipeline-parallel-size", type=int, default=1,
                   help="PP size you will load at: checked now (layers divide).")
    c.add_argument("--target-expert-model-parallel-size", type=int, default=1,
                   help="EP size you will load a mixture of experts at: checked now (experts divide).")
    c.add_argument("--target-expert-tensor-parallel-size", type=int, default=None,
                   help="ETP size you will load a mixture of experts at: checked now (an expert's FFN "
                        "size divides). Default: the TP size.")
    c.add_argument("--dtype", **dtype)

    c = sub.add_parser("peft-to-megatron", help="PEFT LoRA adapter -> full adapter (.safetensors) for --lora-load.")
    c.add_argument("--peft-dir", required=True,
                   help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors).")
    c.add_argument("--base", required=True, help=base_help)
    c.add_argument("--output", required=True, help="New .safetensors file.")
    c.add_argument("--per-projection", action="store_true",
                   help="For per-projection LoRA (--lora-per-projection): q/k/v and gate/up keep their own "
                        "rank-r A, so the adapter stays at PEFT's r (default: distinct A's stacked, rank 3r).")

    c = sub.add_parser("megatron-to-peft", help="Megatron adapter -> PEFT adapter directory.")
    c.add_argument("--adapter", required=True,
                   help="A LoRA --save directory of pretrain_gpt_lora.py, one of its iter_XXXXXXX "
                        "directories, or a full adapter .safetensors.")
    c.add_argument("--base", required=True, help=base_help)
    c.add_argument("--output", required=True, help="New PEFT adapter directory.")
    c.add_argument("--iteration", type=int, default=None,
                   help="Export this dist-checkpoint iteration of --adapter (default: its adapter.safetensors, "
                        "else the latest iteration).")
    c.add_argument("--keep-rank", action="store_true",
                   help="Keep the Megatron rank even where rank components contribute nothing.")
    c.add_argument("--base-model-name-or-path", default=None,
                   help="Written into adapter_config.json (default: --base when it is a Hugging Face directory).")
    c.add_argument("--expert-layout", choices=("fused", "per-expert"), default="fused",
                   help="Mixture-of-experts models: 'fused', transformers 5 / peft's target_parameters on "
                        "mlp.experts.gate_up_proj and down_proj, or 'per-expert', one LoRA per expert projection "
                        "(mlp.experts.E.gate_proj ..., Mixtral block_sparse_moe.experts.E.w1 ...) as inference "
                        "engines and transformers 4 load it.")

    for name, text in (("merge", "Fold an adapter into the base; write a Megatron or Hugging Face checkpoint."),
                       ("megatron-to-hf", "Megatron base checkpoint -> Hugging Face checkpoint.")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--base", required=True, help="Megatron base checkpoint directory (with model_args.json).")
        if name == "merge":
            c.add_argument("--adapter", required=True,
                           help="LoRA --save directory, iter_XXXXXXX directory, full adapter .safetensors, "
                                "or PEFT directory.")
            c.add_argument("--iteration", type=int, default=None, help="Dist-checkpoint iteration of --adapter.")
            c.add_argument("--to", choices=("megatron", "hf"), required=True, help="Output format.")
        c.add_argument("--output", required=True, help="New output directory.")
        c.add_argument("--hf-config-dir", default=None,
                       help="Hugging Face output: the original model directory, whose config.json and tokenizer "
                            "files are kept (default: a config.json written from the checkpoint's sizes).")
        c.add_argument("--dtype", **dtype)
    return p


def run(args) -> None:
    from megatron_lora.hf.adapters import megatron_to_peft, peft_to_megatron
    from megatron_lora.hf.merge import merge
    from megatron_lora.hf.to_megatron import hf_to_megatron

    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.command == "hf-to-megatron":
        hf_to_megatron(args.hf_dir, args.output, args.target_tensor_parallel_size,
                       args.target_pipeline_parallel_size, args.dtype, log, args.target_expert_model_parallel_size,
                       args.target_expert_tensor_parallel_size)
    elif args.command == "peft-to-megatron":
        peft_to_megatron(args.peft_dir, args.output, args.base, log, args.per_projection)
    elif args.command == "megatron-to-peft":
        megatron_to_peft(args.adapter, args.output, args.base, args.iteration, not args.keep_rank,
                         args.base_model_name_or_path, log, args.expert_layout.replace("-", "_"))
    elif args.command == "merge":
        merge(args.base, args.adapter, args.output, args.to, args.hf_config_dir, args.dtype, args.iteration, log)
    else:
        merge(args.base, None, args.output, "hf", args.hf_config_dir, args.dtype, log=log)


def main(argv=None) -> int:
    from megatron_lora.training.quiet import quiet_known_messages

    quiet_known_messages()
    from megatron_lora.core.checkpoint.errors import CheckpointError
    from megatron_lora.hf.mapping import ConversionError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (ConversionError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
