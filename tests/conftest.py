import pytest
import torch

from xtra_ds.models import create_model

pytest_plugins = ["s3server"]  # the loopback S3 server fixtures: s3_server, s3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**kw):
    """A very small XTRA (32 px, 8 px patches, 2×2-patch blocks) for fast CPU tests; override any size."""
    base = dict(img_size=32, block_size=2, dim=32, depth=2, num_heads=2, proj_hidden=48, pred_width=24,
                pred_depth=2, pred_heads=2, head_hidden=40)
    base.update(kw)
    return create_model("xtra_vit_tiny_patch8", **base)
