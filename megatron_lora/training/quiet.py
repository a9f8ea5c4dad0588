"""What the scripts do not print: Megatron-Core and torch messages with nothing for the user to do.

One list for every script (training, conversion, preprocessing) and every Megatron-Core release
they run on. The library filters nothing: a program that imports it sees every message.
"""

import logging
import re
import warnings

_WARNINGS = (
    # Apex / Transformer Engine missing: on CPU that is the expected path.
    ".*(Apex|Transformer Engine) (is|are) not installed.*",
    # Options the scripts never set (megatron-core 0.16-0.19 warn about their defaults).
    ".*cuda_graph_scope.*", ".*full scope is deprecated.*", ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    # Deprecations inside Megatron's dist-checkpoint code (torch's ShardedTensor API, DCP calls).
    ".*`load_state_dict` is deprecated.*", ".*Please use DTensor instead.*",
    ".*The argument order of load has been changed.*",
    ".*torch.distributed is disabled, unavailable or uninitialized.*",
    # megatron-core 0.19: a process without torch.distributed (preprocessing, flag checks), and a
    # module of Megatron's the scripts never use, announced at import.
    ".*Could not determine rank from torch.distributed.*", ".*MimoModelConfig is experimental.*",
)
_LOG_MESSAGES = {
    # Logged when Megatron imports torch.utils.cpp_extension on a host without CUDA: it concerns
    # building CUDA extensions, which CPU mode never does.
    "torch.utils.cpp_extension": "No CUDA runtime is found",
    # megatron-core 0.19, for every GPTModel: which model the script builds is the script's choice.
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    # megatron-core 0.19's synchronous save runs its own deprecated asynchronous path.
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
}


def quiet_known_messages() -> None:
    """Drop the messages above in this process (call before Megatron-Core is imported)."""
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name, text in _LOG_MESSAGES.items():
        pattern = re.compile(re.escape(text))
        logging.getLogger(name).addFilter(lambda record, p=pattern: not p.search(record.getMessage()))
