from dataclasses import replace
from pathlib import Path

import pytest
import torch

from xtra_ds.config import load_config, sizes_from_config
from xtra_ds.models import XTRA, XTRASizes

pytest_plugins = ["helpers.s3server"]  # the loopback S3 server fixtures: s3_server, s3

ROOT = Path(__file__).resolve().parents[1]
MICRO_RECIPE = ROOT / "ds_configs/test_micro.yaml"  # the one tiny model of the tests and smoke runs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_sizes(**overrides) -> XTRASizes:
    """The micro recipe's model sizes (32 px, 8 px patches, 2×2-patch blocks), with overrides."""
    cfg = load_config(MICRO_RECIPE)
    return replace(sizes_from_config(cfg.model, cfg.objective), **overrides)


def tiny(drop_path: float = 0.0, **overrides) -> XTRA:
    """A micro XTRA for fast CPU tests; any size can be overridden."""
    return XTRA(tiny_sizes(**overrides), drop_path=drop_path)
