"""DAB-DETR (Liu et al., ICLR 2022): dynamic anchor boxes as queries, with Group DETR.

Registered: ``dab_detr`` (6 decoder layers, 1 encoder layer; ``decoder_layers: 1`` gives the
one-layer model with the same parts). Modules: ``embedding`` (anchor coding, image positions),
``attention`` (modulated conditional cross-attention), ``decoder``, ``encoder`` (input projection,
encoder layer), ``model`` (:class:`DABDETR` and its flat builder). The matcher, criterion, query
groups, bins head and post-processing are the family's (``students.sparse``).
"""
from students.registry import register_preset
from students.sparse.dab_detr.model import DABDETR, build_dab_detr

__all__ = ["DABDETR", "build_dab_detr"]

register_preset(
    "dab_detr",
    build_dab_detr,
    "DAB-DETR: learned 4-D anchor queries refined by every decoder layer (detached between layers), width/height "
    "modulated conditional cross-attention over multi-scale tokens, Hungarian focal / L1 / GIoU on every layer; "
    "groups > 1 = Group DETR (group 0 at inference).",
)
