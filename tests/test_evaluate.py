"""COCO scoring with pycocotools: per-class and class-agnostic on a hand-built ground truth."""
import contextlib
import io

import pytest
from pycocotools.coco import COCO

from distill.engine.evaluate import METRIC_NAMES, coco_metrics


def ground_truth() -> COCO:
    """One 100x100 image with one box of class 1 (cats 1 and 2 exist)."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 7, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "shirt"}, {"id": 2, "name": "coat"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.mark.parametrize("category, per_class_ap, agnostic_ap", [(1, 1.0, 1.0), (2, 0.0, 1.0)])
def test_a_perfect_box_with_the_wrong_class_scores_only_class_agnostic(category, per_class_ap, agnostic_ap):
    detection = [{"image_id": 7, "category_id": category, "bbox": [10, 20, 30, 40], "score": 0.9}]
    # pycocotools in fp64 on 0 / 1 precisions: exact up to ~1e-16, well inside approx's default rel 1e-6
    assert coco_metrics(ground_truth(), detection)["AP"] == pytest.approx(per_class_ap)
    assert coco_metrics(ground_truth(), detection, class_agnostic=True)["AP"] == pytest.approx(agnostic_ap)


def test_a_box_shifted_to_iou_one_third_misses_at_iou_half_in_both_modes():
    # 30x40 box shifted right by 15: intersection 15x40 = 600, union 1800 -> IoU 1/3 < 0.5
    detection = [{"image_id": 7, "category_id": 1, "bbox": [25, 20, 30, 40], "score": 0.9}]
    for agnostic in (False, True):
        assert coco_metrics(ground_truth(), detection, class_agnostic=agnostic)["AP50"] == 0.0


def test_no_detections_give_zeros():
    assert coco_metrics(ground_truth(), [], class_agnostic=True) == {name: 0.0 for name in METRIC_NAMES}
