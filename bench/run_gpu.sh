#!/usr/bin/env bash
# The engine issue's GPU benchmark in one command, for a machine with one GPU, a python3 that has torch
# (CUDA) and no network: installs from .gpu_wheels/ what that python lacks (DeepSpeed and the packages it
# needs), prints the GPU and versions, then runs bench/bench_gpu.py (XTRA-H/14, bf16, ZeRO-3, activation
# checkpointing; about 3 minutes), then the communication model's table for H/14 at 72 GPUs and
# bench/bench_comm.py on this GPU (plain ZeRO-3 and ZeRO++ qwZ: DeepSpeed's payloads against the model,
# and qwZ's cost per step; about 2 minutes). Results: $OUT/bench_gpu.json, comm_*.json/txt, bench_gpu.log.
#
#   bash bench/run_gpu.sh [bench_gpu.py options]        # from anywhere; OUT defaults to ./bench_gpu_out
#   BUDGET=180 bash bench/run_gpu.sh --sweep 64         # a shorter run
#
# .gpu_wheels/ is ignored by git; build it on any machine with network and copy it along with the
# repository to the GPU machine. It was made with
#   DS_ACCELERATOR=cuda DS_BUILD_OPS=0 .venv/bin/pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .gpu_wheels
#   .venv/bin/pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu_wheels hjson==3.1.0 \
#       pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       typing-extensions==4.16.0 packaging==26.4
# (deepspeed is a py3-none-any wheel without compiled ops; nothing is JIT-built: the optimizer is torch's AdamW).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_gpu_out}
mkdir -p "$OUT"
LOG=$OUT/bench_gpu.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY=${PYTHON:-python3}
BUDGET=${BUDGET:-170}
export PYTHONUNBUFFERED=1
export DS_BUILD_OPS=0 DS_ACCELERATOR=cuda DS_SKIP_CUDA_CHECK=1   # no op is compiled: AdamW is torch's (builder.py)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_bench_gpu}
SITE=/tmp/gpu_wheels_site   # used only if pip cannot install into $PY's environment

echo "== $(date -u +%FT%TZ) $(hostname)  repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi failed)"

echo "== install from .gpu_wheels (only what $PY lacks)"
"$PY" - "$SITE" <<'PYEOF'
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

site = Path(sys.argv[1])
wheels = {re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower(): f for f in Path(".gpu_wheels").glob("*.whl")}


def have(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def vt(v):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


# deepspeed 0.19.8's requirements (its METADATA): einops hjson msgpack ninja numpy packaging>=20 psutil
# py-cpuinfo pydantic>=2 torch tqdm; pydantic 2.14.4 pins pydantic-core 2.50.5 and wants annotated-types>=0.6,
# typing-inspection>=0.4.4, typing-extensions>=4.16 (only when pydantic itself is installed from here).
reqs = [("deepspeed", "0.19.8"), ("hjson", None), ("packaging", "20"), ("einops", None), ("msgpack", None),
        ("ninja", None), ("psutil", None), ("py-cpuinfo", None), ("tqdm", None), ("numpy", None),
        ("pyyaml", None), ("pillow", None)]
if have("pydantic") is None or vt(have("pydantic")) < (2,):
    reqs += [("pydantic", "2.14.4"), ("pydantic-core", "2.50.5"), ("annotated-types", "0.6"),
             ("typing-inspection", "0.4.4"), ("typing-extensions", "4.16")]
todo = []
for dist, minimum in reqs:
    v = have(dist)
    ok = v is not None and (minimum is None or vt(v) >= vt(minimum))
    if dist == "pydantic-core" and v is not None:
        ok = v == minimum  # pinned exactly by the pydantic we install
    if ok:
        print(f"  {dist} {v}: present")
    elif dist in wheels:
        print(f"  {dist} {v or '-'}: install {wheels[dist].name}")
        todo.append(wheels[dist])
    else:
        print(f"  {dist} {v or '-'}: MISSING and no wheel in .gpu_wheels")
if todo:
    files = [str(f) for f in todo]
    tries = [[sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-warn-script-location",
              "--disable-pip-version-check", *files],
             ["uv", "pip", "install", "--python", sys.executable, "--no-index", "--no-deps", *files]]
    for cmd in tries:
        try:
            if subprocess.run(cmd).returncode == 0:
                print(f"  installed with {cmd[0]} {cmd[1]} {cmd[2]}")
                break
        except FileNotFoundError:
            pass
    else:  # no pip, or a read-only environment: unpack the wheels onto PYTHONPATH instead
        site.mkdir(parents=True, exist_ok=True)
        for f in todo:
            zipfile.ZipFile(f).extractall(site)
        print(f"  pip unavailable: unpacked {len(todo)} wheel(s) into {site} (PYTHONPATH)")
PYEOF
if [ -d "$SITE" ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi

echo "== versions"
"$PY" - <<'PYEOF'
import importlib.metadata as md
import sys

print("python", sys.version.split()[0], sys.executable)
for d in ("torch", "triton", "deepspeed", "pydantic", "pydantic-core", "hjson", "typing-extensions", "numpy",
          "pyyaml", "pillow"):
    try:
        print(f"  {d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"  {d} -")
import torch

print("  cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import deepspeed  # noqa: F401 - the bench imports it again; this names a broken install early
    import pydantic  # noqa: F401
    print("  import deepspeed: ok")
except Exception as e:  # noqa: BLE001
    print(f"  import deepspeed FAILED: {type(e).__name__}: {e} (the plain baseline still runs)")
PYEOF

echo "== bench/bench_gpu.py (budget ${BUDGET} s)"
# The bench stops itself (budget, then a hard stop 20 s later) and writes its JSON after every variant;
# timeout is the last guard: TERM (caught: results are written), then KILL.
timeout -k 15 $((BUDGET + 40)) "$PY" bench/bench_gpu.py --budget "$BUDGET" --out "$OUT/bench_gpu.json" "$@"
rc=$?

echo "== communication model: XTRA-H/14 at the paper's scale (predicted; no GPU work)"
"$PY" -m xtra_ds.engine.comm_model --config ds_configs/xtra_vit_h14_in21k.yaml | tee "$OUT/comm_model.txt"

echo "== ZeRO++ on this GPU: bytes DeepSpeed issues per H/14 step vs the model, plain ZeRO-3 and qwZ"
# One rank moves nothing over a wire, but DeepSpeed still issues its gathers and reduce-scatters: their
# payloads check the model on the CUDA build, and the qwZ run checks that the quantizer kernels build and
# what they cost per step (median step time, plain vs qwZ).
for QWZ in false true; do
    timeout -k 10 "${COMM_BUDGET:-75}" "$PY" bench/bench_comm.py --device cuda --recipe ds_configs/xtra_vit_h14_in21k.yaml \
        --ranks 1 --steps 3 --warmup 2 --set optim.global_batch_size=8 --set optim.micro_batch_size=8 --set deepspeed.zero_quantized_weights=$QWZ \
        --json "$OUT/comm_qwz_$QWZ.json" || echo "(bench_comm with qwZ=$QWZ failed or ran out of time: exit $?)"
done
echo "== exit $rc; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log is complete before the command returns
exit $rc
