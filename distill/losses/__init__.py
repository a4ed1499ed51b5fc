"""Distillation losses: one import point for the registry and the built-in losses.

Importing this package registers ``kd``, ``ld``, ``feature``, ``pkd``, ``crosskd``, ``crosskd_query`` and ``box``. The call contract, the
``DistillInputs`` container (:mod:`distill.inputs`) and the training-step recipe are documented in
:mod:`distill.losses.registry`; the shared KL kernel in :mod:`distill.losses.kl`.
"""
from distill.losses.box import BoxDistillation, box_rows
from distill.losses.crosskd import CrossKD, qfl_kd_rows
from distill.losses.crosskd_query import CrossKDQuery
from distill.losses.feature import FeatureMimic, mimic_rows
from distill.losses.kd import ClassificationKD, kd_rows
from distill.losses.kl import binary_kl, softmax_kl, softmax_kl_to_probs, weighted_sum
from distill.losses.ld import LocalizationDistillation, ld_rows, reencode_bins, resample_bins
from distill.losses.pkd import PearsonFeatureMimic, pearson_normalise
from distill.losses.registry import (
    DistillInputs,
    DistillLoss,
    create_loss,
    list_losses,
    loss_from_spec,
    loss_parameters,
    register_loss,
)

__all__ = [
    "BoxDistillation",
    "box_rows",
    "reencode_bins",
    "ClassificationKD",
    "CrossKD",
    "CrossKDQuery",
    "DistillInputs",
    "DistillLoss",
    "FeatureMimic",
    "LocalizationDistillation",
    "PearsonFeatureMimic",
    "binary_kl",
    "create_loss",
    "loss_from_spec",
    "kd_rows",
    "ld_rows",
    "list_losses",
    "loss_parameters",
    "mimic_rows",
    "pearson_normalise",
    "qfl_kd_rows",
    "register_loss",
    "resample_bins",
    "softmax_kl",
    "softmax_kl_to_probs",
    "weighted_sum",
]
