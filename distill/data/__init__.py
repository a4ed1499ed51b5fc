"""Datasets (COCO format), transforms, loaders and the built-in generators (scenes, clutter)."""
from distill.data.clutter import CLASSES as CLUTTER_CLASSES
from distill.data.clutter import generate_clutter as generate_clutter
from distill.data.coco import CocoDetection as CocoDetection
from distill.data.coco import Sample as Sample
from distill.data.loader import EpochSampler as EpochSampler
from distill.data.loader import build_loader as build_loader
from distill.data.loader import collate as collate
from distill.data.loader import load_dataset as load_dataset
from distill.data.loader import set_epoch as set_epoch
from distill.data.scenes import CLASSES as SCENE_CLASSES
from distill.data.scenes import generate_scenes as generate_scenes
from distill.data.transforms import IMAGENET_MEAN as IMAGENET_MEAN
from distill.data.transforms import IMAGENET_STD as IMAGENET_STD
from distill.data.transforms import DetectionTransform as DetectionTransform
from distill.data.transforms import boxes_to_original as boxes_to_original

# Built-in generators by name, for ``--dataset`` options: same signature (out_dir, num_train, num_val,
# size, seed, ...), same folder layout.
GENERATORS = {"scenes": generate_scenes, "clutter": generate_clutter}

__all__ = [
    "CocoDetection", "Sample", "EpochSampler", "build_loader", "collate", "load_dataset", "set_epoch",
    "SCENE_CLASSES", "generate_scenes", "CLUTTER_CLASSES", "generate_clutter",
    "GENERATORS", "IMAGENET_MEAN", "IMAGENET_STD", "DetectionTransform",
    "boxes_to_original",
]
