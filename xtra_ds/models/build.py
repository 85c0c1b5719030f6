"""Build the model a config describes (the only place config and model meet)."""

from __future__ import annotations

from ..config.schema import Config
from .xtra import XTRA, XTRASizes, model_sizes


def sizes_from_config(cfg: Config) -> XTRASizes:
    m, o = cfg.model, cfg.objective
    over = dict(m.overrides)
    over.update(block_size=m.block_size, heads_ahead=o.heads_ahead, num_block_orders=o.num_block_orders)
    if m.img_size:
        over["img_size"] = m.img_size
    if m.pred_depth:
        over["pred_depth"] = m.pred_depth
    if m.head_hidden:
        over["head_hidden"] = m.head_hidden
    return model_sizes(m.name, **over)


def build_model(cfg: Config) -> XTRA:
    model = XTRA(sizes_from_config(cfg), drop_path=cfg.model.drop_path)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model
