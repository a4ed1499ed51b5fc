"""COCO datasets: class mapping, targets, validation errors, clip policy, YAML specs, loaders."""
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import CocoDetection, DetectionTransform, build_loader, load_dataset, set_epoch
from distill.errors import DataError

# Images are 40 high, 60 wide; the transform keeps that size (longer side 60, scale 1).
H, W = 40, 60


def write_dataset(root: Path, annotations: list[dict], images: int = 3, name: str = "train.json",
                  image_dir: str = "images", categories=None) -> Path:
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(images):
        Image.fromarray(np.full((H, W, 3), 40 * k, dtype=np.uint8)).save(root / image_dir / f"{k}.png")
        entries.append({"id": 100 + k, "file_name": f"{k}.png", "width": W, "height": H})
    cats = categories or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]
    for k, ann in enumerate(annotations):
        ann.setdefault("id", k + 1)
        ann.setdefault("iscrowd", 0)
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": cats}))
    return path


def ann(image_id: int, cat: int, bbox: list[float], **extra) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, **extra}


def dataset(root: Path, annotations: list[dict], **kwargs) -> CocoDetection:
    path = write_dataset(root, annotations)
    return CocoDetection(path, root / "images", DetectionTransform(W, hflip_prob=0.0), **kwargs)


def test_classes_sorted_by_id_and_targets(tmp_path):
    anns = [ann(100, 7, [10, 5, 20, 10]), ann(100, 3, [0, 0, 60, 40]), ann(101, 7, [1, 2, 3, 4])]
    ds = dataset(tmp_path, anns)
    assert ds.classes == ["dog", "cat"] and ds.cat_ids == [3, 7]  # ids 3 < 7
    assert ds.image_ids == [100, 101, 102] and len(ds) == 3 and ds.num_classes == 2
    sample = ds[0]
    # xywh [10, 5, 20, 10] -> xyxy [10, 5, 30, 15]; category 7 -> index 1, category 3 -> index 0
    assert sample.target.boxes.tolist() == [[10.0, 5.0, 30.0, 15.0], [0.0, 0.0, 60.0, 40.0]]
    assert sample.target.labels.tolist() == [1, 0]
    assert sample.image.shape == (3, H, W) and sample.image_id == 100 and sample.scale == 1.0
    assert ds.coco.getCatIds() == [7, 3]  # the pycocotools index is kept for evaluation


def test_crowd_excluded_and_empty_image_is_negative(tmp_path):
    ds = dataset(tmp_path, [ann(100, 7, [10, 5, 20, 10]), ann(100, 3, [0, 0, 30, 30], iscrowd=1)])
    assert ds[0].target.labels.tolist() == [1]
    empty = ds[2].target
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    assert empty.labels.dtype == torch.int64


def test_invalid_json_names_file_and_position(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match=r"train\.json: invalid JSON: .* line 2 column"):
        CocoDetection(path, tmp_path, DetectionTransform(32))


def test_missing_image_reported_at_construction(tmp_path):
    path = write_dataset(tmp_path, [])
    (tmp_path / "images" / "1.png").unlink()
    with pytest.raises(DataError, match=r"1\.png \(image id 101\) not found; 1 of 3"):
        CocoDetection(path, tmp_path / "images", DetectionTransform(32))


@pytest.mark.parametrize("bbox, reason", [
    ([10, 5, 0, 10], "non-positive size"),
    ([10, 5, 20, -1], "non-positive size"),
    ([50, 5, 20, 10], "extends outside the 60x40 image"),
    ([-5, 5, 20, 10], "extends outside the 60x40 image"),
    ([61, 5, 20, 10], "lies entirely outside the 60x40 image"),
])
def test_invalid_box_is_an_error_naming_image_and_annotation(tmp_path, bbox, reason):
    with pytest.raises(DataError) as err:
        dataset(tmp_path, [ann(101, 7, [1, 1, 2, 2], id=4), ann(101, 3, bbox, id=9)])
    message = str(err.value)
    assert "train.json" in message and "image id 101, annotation id 9" in message
    assert reason in message and "\n" not in message


def test_box_within_tolerance_is_clamped_silently(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = dataset(tmp_path, [ann(100, 7, [-0.5, 0, 60.5, 40.25])])
    assert ds.original_target(0).boxes.tolist() == [[0.0, 0.0, 60.0, 40.0]]


def test_unknown_category(tmp_path):
    with pytest.raises(DataError, match=r"image id 100, annotation id 1: unknown category id 5"):
        dataset(tmp_path, [ann(100, 5, [1, 1, 2, 2])])


def test_clip_policy_clips_and_drops_with_one_warning(tmp_path):
    anns = [
        ann(100, 7, [50, 10, 20, 10], id=1),   # partly outside: x 50..70 -> clipped to 50..60
        ann(100, 3, [10, 10, 0, 5], id=2),     # zero width: dropped
        ann(101, 7, [70, 10, 5, 5], id=3),     # fully outside: nothing left, dropped
        ann(101, 3, [1, 2, 3, 4], id=4),       # valid
    ]
    with pytest.warns(UserWarning) as record:
        ds = dataset(tmp_path, anns, invalid_boxes="clip")
    assert len(record) == 1
    message = str(record[0].message)
    # one line: counts and the first example of each kind
    assert "clipped 1 boxes partly outside their image (first: image id 100, annotation id 1:" in message
    assert "dropped 2 degenerate boxes (first: image id 100, annotation id 2:" in message
    assert "\n" not in message
    assert ds.original_target(0).boxes.tolist() == [[50.0, 10.0, 60.0, 20.0]]
    assert ds.original_target(1).boxes.tolist() == [[1.0, 2.0, 4.0, 6.0]]
    assert ds.original_target(1).labels.tolist() == [0]


def test_unreadable_image_at_load_time(tmp_path):
    ds = dataset(tmp_path, [])
    (tmp_path / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    ds[0]  # other images still load
    with pytest.raises(DataError, match=r"1\.png: cannot read image \(image id 101\)"):
        ds[1]


def test_image_size_must_match_annotation(tmp_path):
    ds = dataset(tmp_path, [])
    Image.fromarray(np.zeros((H + 1, W, 3), dtype=np.uint8)).save(tmp_path / "images" / "2.png")
    with pytest.raises(DataError, match=r"2\.png: image is 60x41 but .* says 60x40 \(image id 102\)"):
        ds[2]


def test_structure_errors(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="missing list 'categories'"):
        CocoDetection(path, tmp_path, DetectionTransform(32))
    write_dataset(tmp_path, [{"image_id": 100, "category_id": 7}], name="b.json")
    with pytest.raises(DataError, match=r"annotation id 1: missing key 'bbox'"):
        CocoDetection(tmp_path / "b.json", tmp_path / "images", DetectionTransform(32))
    write_dataset(tmp_path, [ann(999, 7, [1, 1, 2, 2])], name="c.json")
    with pytest.raises(DataError, match=r"image id 999, annotation id 1: no image with this id"):
        CocoDetection(tmp_path / "c.json", tmp_path / "images", DetectionTransform(32))


def test_yaml_spec_with_coco2017_layout(tmp_path):
    coco = tmp_path / "coco"
    write_dataset(coco, [ann(100, 3, [2, 2, 4, 4])], name="annotations/instances_val2017.json",
                  image_dir="val2017")
    spec = coco / "coco.yaml"
    spec.write_text("val: {ann_file: annotations/instances_val2017.json, image_root: val2017}\n")
    ds = load_dataset(spec, "val", DetectionTransform(W, hflip_prob=0.0), seed=3)
    assert ds.image_root == coco / "val2017" and ds.seed == 3
    assert ds[0].target.boxes.tolist() == [[2.0, 2.0, 6.0, 6.0]]
    with pytest.raises(DataError, match=r"coco\.yaml: no split 'train' \(has: val\)"):
        load_dataset(spec, "train", DetectionTransform(W))
    # root moves the base folder; paths stay relative to it
    other = tmp_path / "specs" / "coco.yml"
    other.parent.mkdir()
    other.write_text("root: ../coco\n"
                     "val:\n  ann_file: annotations/instances_val2017.json\n  image_root: val2017\n")
    assert len(load_dataset(other, "val", DetectionTransform(W))) == 3


@pytest.mark.parametrize("text, match", [
    ("val: {ann_file: a.json, image_root: img}\nextra: 1\n", r"spec\.yaml: unknown key 'extra'"),
    ("val: {ann_file: a.json, image_root: img, images: x}\n", r"spec\.yaml: unknown key 'val\.images'"),
    ("val: {ann_file: a.json}\n", r"spec\.yaml: missing key 'val\.image_root'"),
    ("val: [1, 2\n", r"spec\.yaml: invalid YAML at line 2"),
])
def test_yaml_spec_errors(tmp_path, text, match):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(DataError, match=match):
        load_dataset(spec, "val", DetectionTransform(32))


def test_folder_dataset_and_missing_split(tmp_path):
    write_dataset(tmp_path, [ann(100, 7, [1, 1, 2, 2])])
    assert len(load_dataset(tmp_path, "train", DetectionTransform(32))) == 3
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: no val.json")):
        load_dataset(tmp_path, "val", DetectionTransform(32))
    with pytest.raises(DataError, match="dataset not found"):
        load_dataset(tmp_path / "nowhere", "val", DetectionTransform(32))


def test_flips_depend_only_on_seed_epoch_index(tmp_path):
    path = write_dataset(tmp_path, [ann(100, 7, [10, 5, 20, 10])], images=3)
    def make() -> CocoDetection:
        return CocoDetection(path, tmp_path / "images", DetectionTransform(W, hflip_prob=0.5), seed=5)

    ds = make()
    by_epoch = {}
    for epoch in range(6):
        ds.set_epoch(epoch)
        by_epoch[epoch] = [ds[i].flipped for i in range(3)]
    assert len({tuple(v) for v in by_epoch.values()}) > 1  # flips change across epochs
    resumed = make()  # a fresh process resuming at epoch 4
    resumed.set_epoch(4)
    assert [resumed[i].flipped for i in range(3)] == by_epoch[4]
    # the flip really is applied: box [10, 5, 30, 15] in width 60 -> [30, 5, 50, 15]
    flipped = resumed.get(0, flip=True)
    assert flipped.flipped and flipped.target.boxes.tolist() == [[30.0, 5.0, 50.0, 15.0]]
    # the same decode and elementwise normalisation of the same pixels (flip only moves them): the same bits
    torch.testing.assert_close(flipped.image, resumed.get(0, flip=False).image.flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(flipped.image, resumed.get(0, flip=True).image, rtol=0, atol=0)


def test_loader_order_and_flips_resume_exactly(tmp_path):
    path = write_dataset(tmp_path, [ann(100 + k, 7, [1, 1, 5, 5]) for k in range(6)], images=6)

    def epoch_batches(epoch: int) -> list[tuple[list[int], list[bool]]]:
        ds = CocoDetection(path, tmp_path / "images", DetectionTransform(W), seed=1)
        loader = build_loader(ds, batch_size=4, shuffle=True, seed=9)
        set_epoch(loader, epoch)
        return [(b.image_ids, b.flipped.tolist()) for b in loader]

    first = epoch_batches(2)
    assert first == epoch_batches(2)
    assert [len(ids) for ids, _ in first] == [4, 2]
    assert sorted(i for ids, _ in first for i in ids) == list(range(100, 106))
    assert first != epoch_batches(3)
    ds = CocoDetection(path, tmp_path / "images", DetectionTransform(W), seed=1)
    plain = build_loader(ds, batch_size=4, shuffle=False, seed=9, drop_last=True)
    assert [b.image_ids for b in plain] == [[100, 101, 102, 103]]
