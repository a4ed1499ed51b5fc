"""Pieces shared by every detector family (dense GFL, sparse query detectors); not a family itself.

``fpn``: the top-down pathway and conv init; ``losses``: Distribution Focal Loss.
"""
