"""The communication model (xtra_ds/costs/comm.py) and its launcher (launchers/plan_cluster.py), the ZeRO++
settings, and the model held against the bytes DeepSpeed really moves on 2 and 4 CPU ranks (bench/bench_comm.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xtra_ds.config import ConfigError, load_config
from xtra_ds.config.deepspeed import deepspeed_dict
from xtra_ds.config.derive import batch_plan
from xtra_ds.config.validate import check_zero_plus_plus
from xtra_ds.costs import comm
from xtra_ds.costs.comm import Cluster, ZeroSetup, gathered_elements, step_payloads, step_time, transfers

from test_engine import shards  # noqa: F401  (a fixture: the tests' small sharded corpus)

ROOT = Path(__file__).resolve().parents[1]


def setup(**kw) -> ZeroSetup:
    return ZeroSetup(**{"stage": 3, "world": 4, "numels": (1000, 10, 4097), "wire_bytes": 2,
                        "persistence_threshold": 100, **kw})


def test_zero3_gathers_partitioned_padded_tensors_and_reduces_all():
    s = setup()
    assert gathered_elements(s) == 1000 + 4100  # 10 elements stay whole; 4097 pads to 4 × 1025
    p = step_payloads(s, accum=2)
    assert p["all_gather_into_tensor"] == 2 * 5100 * 2  # once per micro step, bf16
    assert p["reduce_scatter_tensor"] == 2 * (1000 + 12 + 4100) * 2  # every gradient, each tensor padded


def test_one_rank_gathers_nothing_but_still_reduces():
    p = step_payloads(setup(world=1), accum=1)
    assert p["all_gather_into_tensor"] == 0 and p["reduce_scatter_tensor"] == (1000 + 10 + 4097) * 2


def test_stages_differ_where_deepspeed_does():
    one, two = step_payloads(setup(stage=1), accum=4), step_payloads(setup(stage=2), accum=4)
    params = 1000 + 10 + 4097
    assert one == {"all_reduce": params * 2, "all_gather_into_tensor": params * 2}  # reduce once per step
    assert two == {"all_reduce": 4 * params * 2, "all_gather_into_tensor": params * 2}  # at every micro step


def test_ring_wire_bytes_and_links():
    cluster = Cluster(nodes=2, gpus_per_node=2, inter_gbps=8.0, intra_gbps=80.0)
    t = step_time(setup(stage=2), cluster, micro_batch=1, accum=1, train_flops_per_image=1e9, peak_flops=1e12)
    params = 1000 + 10 + 4097
    # all-reduce: 2 × 3/4 of the payload; all-gather: 3/4; both span the two nodes
    assert t.inter_bytes == pytest.approx((2 * 0.75 + 0.75) * params * 2)
    assert t.intra_bytes == 0
    assert t.comm_s == pytest.approx(t.inter_bytes * 8 / 8e9)
    assert t.compute_s == pytest.approx(1e9 / (1e12 * 0.5))
    assert t.mfu_ceiling(0.5) == pytest.approx(0.5 * min(1, t.compute_s / t.comm_s))


def test_zero_plus_plus_options_move_fewer_bytes_where_they_apply():
    base = setup(backward_gather=True)
    names = [t.what for t in transfers(base, 1)]
    assert names == ["parameters, forward", "parameters, backward", "gradients (reduce-scatter)"]
    assert len(transfers(setup(hpz=2), 1)) == 2  # no backward gather: nothing for hpZ to serve
    hpz = [t for t in transfers(setup(backward_gather=True, hpz=2, world=8), 1, gpus_per_node=4)]
    assert hpz[1].group == 2 and not hpz[1].spans_nodes and hpz[0].spans_nodes
    qwz = transfers(setup(qwz=True), 1)[0]
    assert qwz.payload == pytest.approx(gathered_elements(setup()) * (1 + 4 / comm.QUANT_GROUP))  # int8 + scales
    qgz = transfers(setup(qgz=True, world=8), 1, gpus_per_node=4)
    assert [t.op for t in qgz[1:]] == ["all_to_all_single", "all_to_all_single"]
    assert [t.spans_nodes for t in qgz[1:]] == [False, True]
    one_node = transfers(setup(qgz=True, world=4), 1, gpus_per_node=4)  # DeepSpeed falls back on one node
    assert one_node[-1].op == "reduce_scatter_tensor"


def test_zero_plus_plus_settings_are_validated_and_reach_deepspeed():
    cfg = load_config(ROOT / "ds_configs/xtra_vit_h14_in21k.yaml", ["deepspeed.zero_hpz_partition_size=8"])
    zo = deepspeed_dict(cfg, batch_plan(cfg.optim, 72))["zero_optimization"]
    # the paper-scale recipe keeps the paper's bf16 numerics; qwZ is a switch (docs/PERFORMANCE.md, "Scaling plan")
    assert (zo["zero_hpz_partition_size"], zo["zero_quantized_weights"], zo["zero_quantized_gradients"]) == \
        (8, False, False)
    cfg = load_config(ROOT / "ds_configs/xtra_vit_h14_in21k.yaml", ["deepspeed.zero_quantized_weights=true"])
    assert deepspeed_dict(cfg, batch_plan(cfg.optim, 72))["zero_optimization"]["zero_quantized_weights"] is True
    check_zero_plus_plus(cfg.deepspeed, 72, 8, "cuda")
    with pytest.raises(ConfigError, match=r"must divide the 8 ranks of a node.*\[2, 4, 8\]"):
        check_zero_plus_plus(load_config(ROOT / "ds_configs/xtra_vit_h14_in21k.yaml",
                                         ["deepspeed.zero_hpz_partition_size=3"]).deepspeed, 72, 8, "cuda")
    quantized = load_config(ROOT / "ds_configs/tiny_cpu.yaml", ["deepspeed.zero_quantized_weights=true"])
    with pytest.raises(ConfigError, match="CUDA quantizer kernels"):
        check_zero_plus_plus(quantized.deepspeed, 2, 2, "cpu")
    with pytest.raises(ConfigError, match="ZeRO\\+\\+ option of ZeRO-3"):
        load_config(ROOT / "ds_configs/tiny_cpu.yaml",
                    ["deepspeed.zero_stage=2", "deepspeed.zero_quantized_gradients=true"])


def test_cli_prints_the_table_for_the_paper_scale():
    r = subprocess.run([sys.executable, str(ROOT / "launchers/plan_cluster.py"), "--config",
                        str(ROOT / "ds_configs/xtra_vit_h14_in21k.yaml"), "--nodes", "9", "--gpus-per-node", "8",
                        "--inter-gbps", "400", "--intra-gbps", "3600"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "865M parameters" in out and "29 per GPU × 1 micro step(s) × 72" in out
    assert "the recipe as configured: ZeRO-3\n" in out  # qwZ is a switch, off until a GPU shows its loss curve
    rows = {line[:26].strip(): line.split() for line in out.splitlines() if line.startswith("ZeRO")}
    assert set(rows) >= {"ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3 + qwZ + qgZ"}
    assert float(rows["ZeRO-3 + qwZ + qgZ"][-6]) < float(rows["ZeRO-3"][-6])  # fewer GB per GPU and step


@pytest.mark.slow
@pytest.mark.parametrize("recipe,ranks,extra", [
    ("ds_configs/tiny_cpu.yaml", 2, []),
    ("ds_configs/tiny_cpu.yaml", 4, []),
    ("ds_configs/tiny_cpu.yaml", 2, ["deepspeed.zero_stage=2"]),
    ("ds_configs/tiny_cpu.yaml", 2, ["deepspeed.max_live_parameters=1000"]),
])
def test_predicted_bytes_match_what_deepspeed_moves(recipe, ranks, extra, tmp_path):
    """DeepSpeed's communication logger on real ranks (gloo), two micro steps per optimizer step: every
    collective the model predicts is within 10% of the measured bytes, and nothing big goes unmodelled."""
    cmd = [sys.executable, str(ROOT / "bench/bench_comm.py"), "--recipe", recipe, "--ranks", str(ranks),
           "--accum", "2", "--json", str(tmp_path / "out.json")]
    for item in extra:
        cmd += ["--set", item]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    measured, predicted = result["measured"], result["predicted"]
    for op, want in predicted.items():
        assert measured.get(op, 0) == pytest.approx(want, rel=0.1), (op, measured, predicted)
    total = sum(measured.values())
    assert sum(v for op, v in measured.items() if op not in predicted) < 0.01 * total, (measured, predicted)


@pytest.mark.slow
def test_hpz_on_two_emulated_nodes_trains_like_plain_zero3(shards, tmp_path):  # noqa: F811
    """ZeRO++ hpZ, groups of 2 inside each of 2 emulated nodes × 2 ranks (the real node launcher, gloo): the
    losses of 6 steps equal plain ZeRO-3's on 4 ranks of one node (fp32: only reduction order differs)."""
    import base64

    from xtra_ds.engine.dist import free_port

    from test_engine import RECIPE, launch, losses

    fp32 = ["deepspeed.precision=fp32", "checkpoint.export_every=0", "logging.recon_every=0", "logging.log_every=1"]
    rc, out = launch(tmp_path / "plain", shards, 6, *fp32, gpus=4)
    assert rc == 0, out
    world = base64.urlsafe_b64encode(json.dumps({"node0": [0, 1], "node1": [0, 1]}).encode()).decode()
    port, run_dir = free_port(), tmp_path / "hpz"
    procs = [subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                               f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(ROOT / "launchers/pretrain.py"), "--config", RECIPE, f"data.train={shards}",
                               f"run_dir={run_dir}", "schedule.total_steps=6", "deepspeed.zero_hpz_partition_size=2",
                               *fp32], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for n in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert (run_dir / "config.yaml").read_text().count("zero_hpz_partition_size: 2") == 1
    want, got = losses(tmp_path / "plain"), losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)


@pytest.mark.slow
def test_hpz_that_straddles_nodes_is_refused_before_start(shards, tmp_path):  # noqa: F811
    from test_engine import launch

    rc, out = launch(tmp_path / "run", shards, 2, "deepspeed.zero_hpz_partition_size=4", gpus=2)
    assert rc != 0 and "deepspeed.zero_hpz_partition_size=4: hpZ groups are 4 consecutive ranks" in out, out


def test_bench_comm_overrides_reach_the_measured_engine(monkeypatch):
    """`bench/bench_comm.py --set deepspeed.extra=…` once reached only the prediction: the measuring ranks
    replaced deepspeed.extra with their communication logger."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # as python does for a script: bench/_common.py is beside it
    spec = importlib.util.spec_from_file_location("bench_comm", ROOT / "bench/bench_comm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = bench.measured_config("ds_configs/tiny_cpu.yaml", 2, 1,
                                ["deepspeed.extra={zero_optimization: {sub_group_size: 1000}}"])
    assert cfg.deepspeed.extra["zero_optimization"] == {"sub_group_size": 1000}
    assert cfg.deepspeed.extra["comms_logger"]["enabled"] is True
    d = deepspeed_dict(cfg, batch_plan(cfg.optim, 2))
    assert d["zero_optimization"]["sub_group_size"] == 1000 and d["comms_logger"]["prof_all"] is True
