"""What a run costs, worked out from the config and the model's sizes before anything is built.

flops (FLOPs per image, MFU) · memory (model-state bytes per rank, the pre-flight ``check_fits``) · comm
(bytes each ZeRO variant moves per step, and what that costs on a cluster; ``launchers/plan_cluster.py``).
Built on ``models`` and ``config`` only: the engine, the launchers and the benchmarks ask here.
"""

from .comm import (
    QUANT_GROUP,
    VARIANTS,
    Cluster,
    StepTime,
    Transfer,
    ZeroSetup,
    comm_table,
    gathered_elements,
    reduced_elements,
    step_payloads,
    step_time,
    transfers,
    zero_setup_from_config,
)
from .flops import PEAK_BF16_FLOPS, attention_flops, forward_flops, mfu, peak_flops, train_flops_per_image
from .memory import (
    RUNTIME_BYTES,
    Estimate,
    advice,
    bytes_per_parameter,
    check_fits,
    device_memory,
    estimate,
    parameter_numels,
    process_rss,
)

__all__ = [
    "forward_flops", "attention_flops", "train_flops_per_image", "PEAK_BF16_FLOPS", "peak_flops", "mfu",
    "Estimate", "RUNTIME_BYTES", "bytes_per_parameter", "estimate", "check_fits", "advice", "device_memory",
    "process_rss", "parameter_numels",
    "Cluster", "ZeroSetup", "Transfer", "StepTime", "QUANT_GROUP", "VARIANTS", "gathered_elements",
    "reduced_elements", "transfers", "step_payloads", "step_time", "zero_setup_from_config", "comm_table",
]
