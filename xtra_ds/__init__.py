"""xtra-ds: distributed pre-training of XTRA block-causal auto-regressive image models."""

__version__ = "0.1.0"

from .models import XTRA, create_model, model_names  # noqa: E402

__all__ = ["XTRA", "create_model", "model_names", "__version__"]
