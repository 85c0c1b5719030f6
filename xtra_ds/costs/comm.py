"""How many bytes a training step moves between GPUs, and what that costs at a cluster's bandwidths.

Pure functions. :func:`step_payloads` gives, per optimizer step and per rank, the payload of every
collective DeepSpeed issues, under the names its communication logger uses (all-gathers counted as
the gathered tensor, reduce-scatters as their input, all-reduces as the tensor), so that
``bench/bench_comm.py`` can hold them against what DeepSpeed really moved. :func:`step_time` turns
the payloads into seconds on a cluster (ring collectives: each member sends and receives
(n-1)/n of the payload; a collective that spans nodes runs at the inter-node bandwidth per GPU, one
inside a node at the intra-node bandwidth) and compares them with the compute of the same step.

What DeepSpeed 0.19.8 does, as measured on CPU ranks (bench/bench_comm.py, docs/PERFORMANCE.md):

- ZeRO-1: gradients all-reduced once per optimizer step; updated parameters all-gathered once.
- ZeRO-2: gradients all-reduced at every micro step (bucketed all-reduce, not reduce-scatter);
  parameters all-gathered once per optimizer step.
- ZeRO-3: partitioned parameters all-gathered once per micro step, and gradients reduce-scattered
  at every micro step. The backward pass and the activation-checkpoint recompute did not gather
  again in any configuration measured (defaults; ``stage3_max_reuse_distance=0``;
  ``max_live_parameters=1000``; with and without activation checkpointing; counted both by
  DeepSpeed's logger and by a wrapper around ``torch.distributed``), although ZeRO-3 is usually
  described with a second gather in the backward. ``backward_gather=True`` counts that second
  gather, for other versions or settings that do it. Parameters of at most
  ``stage3_param_persistence_threshold`` elements are never partitioned (no gather), but their
  gradients are reduced. Each tensor is padded to a multiple of the world size.
- ZeRO++ (ZeRO-3 only): hpZ (``zero_hpz_partition_size`` = h) keeps a secondary copy partitioned
  within groups of h ranks, used by the backward's gathers — so it saves traffic only where there is
  a backward gather (not in the measured behaviour above); qwZ gathers weights as int8 (half of
  bf16) with an fp32 scale per group of at most 8000 elements; qgZ replaces the gradient
  reduce-scatter by an int4 all-to-all within the node and then across nodes (a quarter of bf16,
  per hop). The quantized kernels are CUDA-only: their bytes are modelled, not measured here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import batch_plan, sizes_from_config
from .flops import train_flops_per_image
from .memory import parameter_numels

QUANT_GROUP = 8000  # DeepSpeed's weight quantizer: groups of at most 8000 elements, one fp32 scale each


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    inter_gbps: float  # Gbit/s per GPU between nodes (its NIC share), one direction
    intra_gbps: float  # Gbit/s per GPU inside a node (NVLink, PCIe), one direction

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ZeroSetup:
    stage: int
    world: int
    numels: tuple[int, ...]  # every trainable parameter's element count
    wire_bytes: int  # bytes per element of parameters and gradients on the wire (2: bf16/fp16, 4: fp32)
    persistence_threshold: int = 100_000  # ZeRO-3: parameters this small stay whole on every rank
    backward_gather: bool = False  # ZeRO-3 gathers the parameters again in the backward (see above)
    hpz: int = 1  # ZeRO++ hierarchical partition size
    qwz: bool = False  # ZeRO++ quantized weights
    qgz: bool = False  # ZeRO++ quantized gradients

    @property
    def params(self) -> int:
        return sum(self.numels)


def _padded(n: int, world: int) -> int:
    return -(-n // world) * world


def gathered_elements(s: ZeroSetup) -> int:
    """Elements one full ZeRO-3 parameter gather brings in (partitioned tensors, padded)."""
    return sum(_padded(n, s.world) for n in s.numels if n > s.persistence_threshold)


def reduced_elements(s: ZeroSetup) -> int:
    """Elements of one full gradient reduction (ZeRO-3 pads each tensor to the world size)."""
    if s.stage == 3:
        return sum(_padded(n, s.world) for n in s.numels)
    return s.params


@dataclass(frozen=True)
class Transfer:
    """One kind of collective in a step: ``payload`` bytes per call, ``calls`` per optimizer step, over
    a group of ``group`` ranks that ``spans_nodes`` or not."""
    op: str  # the name DeepSpeed's communication logger uses
    what: str
    payload: float
    calls: int
    group: int
    spans_nodes: bool

    def wire_bytes(self) -> float:
        """Bytes each member sends per optimizer step: (n-1)/n of the payload per call in a ring, twice
        that for an all-reduce (a reduce-scatter and an all-gather)."""
        rounds = 2 if self.op == "all_reduce" else 1
        return rounds * self.payload * self.calls * (self.group - 1) / self.group


def transfers(s: ZeroSetup, accum: int, gpus_per_node: int | None = None) -> list[Transfer]:
    """Every collective of one optimizer step of ``accum`` micro steps, per rank."""
    g = gpus_per_node or s.world
    multi = s.world > g
    b = s.wire_bytes
    if s.stage in (1, 2):
        grads = Transfer("all_reduce", "gradients (all-reduce)", s.params * b, accum if s.stage == 2 else 1,
                         s.world, multi)
        params = Transfer("all_gather_into_tensor", "updated parameters", s.params * b, 1, s.world, multi)
        return [grads, params]
    gathered = gathered_elements(s) if s.world > 1 else 0  # one rank holds everything: DeepSpeed gathers nothing
    out = []
    fwd_bytes = gathered * (1 + 4 / QUANT_GROUP) if s.qwz else gathered * b
    out.append(Transfer("all_gather_into_tensor", "parameters, forward" + (" (int8, qwZ)" if s.qwz else ""),
                        fwd_bytes, accum, s.world, multi))
    if s.backward_gather:
        h = s.hpz if s.hpz > 1 else s.world
        within = h <= g
        out.append(Transfer("all_gather_into_tensor", "parameters, backward" + (f" (hpZ, groups of {h})"
                            if s.hpz > 1 else ""), gathered * b, accum, h, not within and multi))
    reduced = reduced_elements(s)
    if s.qgz and multi:
        nodes = s.world // g
        out.append(Transfer("all_to_all_single", "gradients, int4 all-to-all in the node (qgZ)", reduced * 0.5,
                            accum, g, False))
        out.append(Transfer("all_to_all_single", "gradients, int4 all-to-all across nodes (qgZ)",
                            reduced * 0.5 / g, accum, nodes, True))
    else:
        out.append(Transfer("reduce_scatter_tensor", "gradients (reduce-scatter)", reduced * b, accum, s.world,
                            multi))
    return out


def step_payloads(s: ZeroSetup, accum: int) -> dict[str, float]:
    """Bytes per optimizer step by collective, as DeepSpeed's communication logger counts them
    (payload × calls; all-reduces of the gradient norm and the like are left out: bytes)."""
    out: dict[str, float] = {}
    for t in transfers(s, accum):
        out[t.op] = out.get(t.op, 0.0) + t.payload * t.calls
    return out


@dataclass(frozen=True)
class StepTime:
    transfers: list[Transfer]
    comm_s: float  # all collectives back to back
    inter_bytes: float  # bytes each GPU sends across nodes per step
    intra_bytes: float
    compute_s: float  # the step's model FLOPs at the target MFU
    images: int  # per GPU per step

    def mfu_ceiling(self, target: float) -> float:
        """MFU if compute runs at ``target`` and communication overlaps it perfectly."""
        return target * min(1.0, self.compute_s / self.comm_s) if self.comm_s else target

    def mfu_serial(self, target: float) -> float:
        """MFU if nothing overlaps."""
        return target * self.compute_s / (self.compute_s + self.comm_s)


def step_time(s: ZeroSetup, cluster: Cluster, micro_batch: int, accum: int, train_flops_per_image: float,
              peak_flops: float, target_mfu: float = 0.5) -> StepTime:
    ts = transfers(s, accum, cluster.gpus_per_node)
    inter = sum(t.wire_bytes() for t in ts if t.spans_nodes)
    intra = sum(t.wire_bytes() for t in ts if not t.spans_nodes)
    comm = inter * 8 / (cluster.inter_gbps * 1e9) + intra * 8 / (cluster.intra_gbps * 1e9)
    images = micro_batch * accum
    compute = images * train_flops_per_image / (peak_flops * target_mfu)
    return StepTime(ts, comm, inter, intra, compute, images)


def zero_setup_from_config(cfg, world: int, numels: tuple[int, ...] | None = None,
                           backward_gather: bool = False) -> ZeroSetup:
    """The :class:`ZeroSetup` of a config (its ``deepspeed.*``) on ``world`` ranks; the parameter list is
    read from the model built on the meta device unless given."""
    if numels is None:
        numels = parameter_numels(sizes_from_config(cfg.model, cfg.objective))
    ds = cfg.deepspeed
    return ZeroSetup(stage=ds.zero_stage, world=world, numels=numels,
                     wire_bytes=2 if ds.precision in ("bf16", "fp16") else 4,
                     persistence_threshold=ds.param_persistence_threshold, hpz=ds.zero_hpz_partition_size,
                     qwz=ds.zero_quantized_weights, qgz=ds.zero_quantized_gradients, backward_gather=backward_gather)


VARIANTS = [  # (label, stage, hpz (0 = the GPUs per node), qwz, qgz)
    ("ZeRO-1", 1, 1, False, False),
    ("ZeRO-2", 2, 1, False, False),
    ("ZeRO-3", 3, 1, False, False),
    ("ZeRO-3 + hpZ", 3, 0, False, False),
    ("ZeRO-3 + qwZ", 3, 1, True, False),
    ("ZeRO-3 + qgZ", 3, 1, False, True),
    ("ZeRO-3 + qwZ + qgZ", 3, 1, True, True),
    ("ZeRO-3 + hpZ + qwZ + qgZ", 3, 0, True, True),
]


def comm_table(cfg, cluster: Cluster, peak_flops: float, target_mfu: float, backward_gather: bool = False) -> str:
    """The step's communication under each ZeRO variant for ``cfg`` on ``cluster``, as text
    (``launchers/plan_cluster.py`` prints it)."""
    plan = batch_plan(cfg.optim, cluster.world)
    base = zero_setup_from_config(cfg, cluster.world, backward_gather=backward_gather)
    flops = train_flops_per_image(sizes_from_config(cfg.model, cfg.objective))
    gb = 1e9
    lines = [
        f"{cfg.model.name}: {base.params / 1e6:.0f}M parameters, {flops / 1e12:.2f} TFLOP per image per training "
        f"step; {cluster.nodes} nodes × {cluster.gpus_per_node} GPUs; global batch {plan.global_batch} = "
        f"{plan.micro_batch} per GPU × {plan.accum} micro step(s) × {cluster.world}",
        f"links per GPU: {cluster.inter_gbps:g} Gbit/s between nodes ({cluster.inter_gbps / 8:g} GB/s), "
        f"{cluster.intra_gbps:g} Gbit/s inside a node ({cluster.intra_gbps / 8:g} GB/s); compute at "
        f"{target_mfu:.0%} MFU of {peak_flops / 1e12:g} TFLOP/s; {base.wire_bytes} bytes per element on the wire",
        "",
        f"{'variant':<26}{'GB/GPU/step':>12}{'across':>8}{'inside':>8}{'comm ms':>9}{'compute ms':>11}"
        f"{'MFU overlap':>12}{'MFU serial':>11}",
    ]
    for label, stage, hpz, qwz, qgz in VARIANTS:
        s = replace(base, stage=stage, hpz=hpz or cluster.gpus_per_node, qwz=qwz, qgz=qgz)
        t = step_time(s, cluster, plan.micro_batch, plan.accum, flops, peak_flops, target_mfu)
        lines.append(f"{label:<26}{(t.inter_bytes + t.intra_bytes) / gb:>12.2f}{t.inter_bytes / gb:>8.2f}"
                     f"{t.intra_bytes / gb:>8.2f}{t.comm_s * 1e3:>9.1f}{t.compute_s * 1e3:>11.1f}"
                     f"{t.mfu_ceiling(target_mfu):>12.0%}{t.mfu_serial(target_mfu):>11.0%}")
    chosen = next((label for label, stage, hpz, qwz, qgz in VARIANTS
                   if (stage, hpz != 1, qwz, qgz) == (base.stage, base.hpz > 1, base.qwz, base.qgz)),
                  "a combination the table leaves out")
    lines += ["", f"the recipe as configured: {chosen}"]
    lines += ["", "GB/GPU/step: bytes each GPU sends per optimizer step (ring collectives); across / inside: over "
              "the inter- / intra-node links. MFU overlap: the ceiling if communication hides under compute "
              "perfectly; serial: if nothing overlaps. ZeRO-3: "
              + ("a second parameter gather in the backward is counted (--backward-gather), which hpZ keeps "
                 "inside the node." if backward_gather else
                 "one parameter gather per micro step, as DeepSpeed 0.19.8 was measured to do; hpZ serves only "
                 "backward gathers, so it changes nothing here (--backward-gather counts a second one).")]
    return "\n".join(lines)

