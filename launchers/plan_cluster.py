"""What a recipe's training step moves between GPUs on a cluster, under each ZeRO variant, and the MFU it leaves.

    .venv/bin/python launchers/plan_cluster.py --config ds_configs/xtra_vit_h14_in21k.yaml \\
        --nodes 9 --gpus-per-node 8 --inter-gbps 400 --intra-gbps 3600

The model (bytes per collective, ring costs, what DeepSpeed was measured to do) is xtra_ds/costs/comm.py;
docs/PERFORMANCE.md, "Scaling plan", reads the table for the paper's scale.
"""

from __future__ import annotations

import argparse
import sys

from xtra_ds.config import ConfigError, load_config
from xtra_ds.costs import PEAK_BF16_FLOPS, Cluster, comm, comm_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launchers/plan_cluster.py", description=comm.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a recipe, e.g. ds_configs/xtra_vit_h14_in21k.yaml")
    parser.add_argument("--nodes", type=int, default=9)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--inter-gbps", type=float, default=400.0,
                        help="Gbit/s per GPU between nodes, one direction (default 400: one NDR NIC per GPU)")
    parser.add_argument("--intra-gbps", type=float, default=3600.0,
                        help="Gbit/s per GPU inside a node, one direction (default 3600 = 450 GB/s, NVLink 4; "
                             "NVLink's '900 GB/s' counts both directions)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_FLOPS["H100"] / 1e12,
                        help="dense bf16 peak per GPU (default: H100/H200)")
    parser.add_argument("--target-mfu", type=float, default=0.5, help="the kernels' efficiency when not waiting")
    parser.add_argument("--backward-gather", action="store_true",
                        help="count a second ZeRO-3 parameter gather in the backward (not what was measured)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.micro_batch_size=48")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cluster = Cluster(args.nodes, args.gpus_per_node, args.inter_gbps, args.intra_gbps)
        print(comm_table(cfg, cluster, args.peak_tflops * 1e12, args.target_mfu, args.backward_gather))
    except ConfigError as e:
        print(f"config error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
