from .xtra import XTRA, XTRAEncoder, XTRAOutput, XTRASizes, create_model, model_names, model_sizes

__all__ = ["XTRA", "XTRAEncoder", "XTRAOutput", "XTRASizes", "create_model", "model_names", "model_sizes"]
