"""GFocal V1 students: importing this package registers ``gfl`` and its presets."""
from students.gfl.detector import GFL
from students.gfl.fpn import FPN
from students.gfl.head import GFLHead, dense_points, gn_groups
from students.gfl.postprocess import postprocess_dense

__all__ = ["GFL", "FPN", "GFLHead", "dense_points", "gn_groups", "postprocess_dense"]
