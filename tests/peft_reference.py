"""The reference the conversion tests compare PEFT adapters by: each projection's weight delta."""

from typing import Dict, Tuple

import torch

from megatron_lora.hf.peft_adapters import PEFT_KEY


def peft_deltas(tensors: Dict[str, torch.Tensor], scale: float) -> Dict[Tuple[int, str], torch.Tensor]:
    """{(layer, projection): s·B·A} of a PEFT adapter (for checks and tests), in float64."""
    out = {}
    for key, a in tensors.items():
        m = PEFT_KEY.match(key)
        if m and m.group(4) == "A":
            b = tensors[key[: -len("lora_A.weight")] + "lora_B.weight"]
            out[(int(m.group(1)), m.group(3))] = scale * (b.double() @ a.double())
    return out
