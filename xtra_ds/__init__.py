"""xtra-ds: distributed pre-training of XTRA block-causal auto-regressive image models."""

__version__ = "0.1.0"

__all__ = ["XTRA", "create_model", "model_names", "__version__"]


def __getattr__(name):
    # Lazy, so that light users (data_prep workers, the shard format) do not import torch.
    if name in ("XTRA", "create_model", "model_names"):
        from . import models
        return getattr(models, name)
    raise AttributeError(f"module 'xtra_ds' has no attribute {name!r}")
