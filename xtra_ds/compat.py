"""The oldest PyTorch the code runs on, checked (without importing torch) by the modules that need it."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

TORCH_FLOOR = (2, 5)
# Why 2.5: checkpoints are read with torch.serialization.safe_globals (2.5) so that nothing but tensors, plain
# data and DeepSpeed's optimizer-state classes is unpickled; model.attention=flex needs
# torch.nn.attention.flex_attention (2.5). Newer releases are used when present (torch.utils.serialization's
# CRC-32 switch, 2.7, only speeds up re-partitioning).


def check_torch(found: str | None = None) -> None:
    """Refuse a torch older than :data:`TORCH_FLOOR` with what to install (``found``: the installed version)."""
    if found is None:
        try:
            found = version("torch")
        except PackageNotFoundError:
            return  # an unusual install (a source build on PYTHONPATH): let the import itself decide
    numbers = tuple(int(n) for n in re.findall(r"\d+", found)[:2])
    if numbers < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(f"xtra-ds needs torch >= {floor}; this environment has torch {found}. Install a newer "
                          f"build: the CPU one with `pip install torch==2.13.0`, or the CUDA build that matches "
                          f"your driver (docs/INSTALL.md)")
