"""Rank worker of ``test_hf_families_e2e.py``: the training script's model for validated flags.

The flags are parsed and validated in the pytest process (as the script does before it starts
its ranks, tokenizer included); each rank builds the model with the script's own ``build_model``
(base from ``--pretrained-checkpoint``, adapter from ``--lora-load``) and returns its logits.
Kept apart from the test module so that ranks do not import transformers or peft.
"""

from tests.distributed.convert_cases import _megatron_logits


class _Quiet:
    def line(self, text: str) -> None:
        pass


def logits_worker(runs, ids):
    """[logits of ``ids`` gathered over TP: [b, s, vocab]] for each args namespace in ``runs``."""
    from megatron_lora.training.loop import build_model

    out = []
    for args in runs:
        _, model = build_model(args, _Quiet())
        out.append(_megatron_logits(model, ids))
    return out
