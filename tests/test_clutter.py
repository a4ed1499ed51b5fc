"""Built-in clutter data: byte-determinism, 20 classes, visible-pixel boxes, the occlusion rule,
scale range, COCO validity, CLI and its one-line errors."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke, one_error_line
from pycocotools.coco import COCO

from distill.data import CLUTTER_CLASSES, DetectionTransform, generate_clutter, load_dataset
from distill.data.clutter import MIN_SIDE, ClutterConfig, _admissible, load_photos, load_pool, make_clutter
from distill.data.synth import Canvas, box_iou
from distill.errors import ConfigError

SMALL = dict(num_train=4, num_val=2, size=64)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    generate_clutter(tmp_path / "a", seed=3, **SMALL)
    generate_clutter(tmp_path / "b", seed=3, **SMALL)
    generate_clutter(tmp_path / "c", seed=4, **SMALL)
    a, b, c = digests(tmp_path / "a"), digests(tmp_path / "b"), digests(tmp_path / "c")
    assert len(a) == 4 + 2 + 2 and a == b
    assert a.keys() == c.keys() and a["train.json"] != c["train.json"]
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left


def test_twenty_classes_and_coco_validity(tmp_path):
    summary = generate_clutter(tmp_path / "d", seed=0, **SMALL)
    assert len(CLUTTER_CLASSES) == 20 == len(set(CLUTTER_CLASSES))
    assert CLUTTER_CLASSES[:3] == ("bear", "bird", "cat") and CLUTTER_CLASSES[-1] == "digit 9"
    coco = COCO(str(tmp_path / "d" / "val.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLUTTER_CLASSES)
    info = json.loads((tmp_path / "d" / "train.json").read_text())["info"]
    assert info["generator"] == "distill.data.clutter.generate_clutter" and info["seed"] == 0
    assert "visible" in info["description"] and "real" in info["description"]
    train = load_dataset(tmp_path / "d", "train", DetectionTransform(64))  # validates every box
    val = load_dataset(tmp_path / "d", "val", DetectionTransform(64))
    assert train.classes == list(CLUTTER_CLASSES) and train.cat_ids == list(range(1, 21))
    assert set(train.image_ids).isdisjoint(val.image_ids)
    assert summary["train"]["objects"] == len(train.coco.anns) >= 4 * 8  # many objects per image
    assert 0 < summary["train"]["occluded"] < summary["train"]["objects"]
    assert train[0].image.shape == (3, 64, 64)


def test_literal_visible_boxes():
    """A 4x4 square A at (0, 0); B (4x4) over its right half; C (2x2) over its lower-left corner."""
    canvas = Canvas(np.zeros((8, 8, 3), dtype=np.float32))
    square, small = np.ones((4, 4), dtype=bool), np.ones((2, 2), dtype=bool)
    red = np.full((4, 4, 3), 255.0, dtype=np.float32)
    assert canvas.paste(red, square, 0, 0) == 0
    assert canvas.hidden_by(square, 0, 2).tolist() == [8]
    assert canvas.visible_box(0, (square, 0, 2)).tolist() == [0, 0, 2, 4]  # as if B were there
    assert canvas.visible_box(0).tolist() == [0, 0, 4, 4]  # ... but it is not yet
    canvas.paste(red, square, 0, 2)
    assert canvas.visible == [8, 16] and canvas.pasted == [16, 16]
    assert canvas.visible_box(0).tolist() == [0, 0, 2, 4] and canvas.visible_box(1).tolist() == [2, 0, 6, 4]
    canvas.paste(red[:2, :2], small, 2, 0)
    assert canvas.visible_box(0).tolist() == [0, 0, 2, 2]  # shrinks in both directions
    assert canvas.visible == [4, 16, 4]
    assert (canvas.owner[:2, :2] == 0).all() and (canvas.owner[2:4, :2] == 2).all()


def test_literal_occlusion_rule():
    """min_visible refuses a placement that hides too much of an earlier object; max_iou one whose box
    overlaps what is left of an earlier box too much."""
    canvas = Canvas(np.zeros((8, 8, 3), dtype=np.float32))
    square = np.ones((4, 4), dtype=bool)
    canvas.paste(np.zeros((4, 4, 3), dtype=np.float32), square, 0, 0)
    cfg = ClutterConfig(size=32, min_visible=0.4, max_iou=0.5)
    assert _admissible(canvas, square, 0, 2, cfg)  # hides 8 of 16: 0.5 >= 0.4, boxes do not overlap
    assert not _admissible(canvas, square, 0, 1, cfg)  # hides 12 of 16: 0.25 < 0.4
    # At (1, 1) it hides 9 of 16 (0.44 kept); A's visible L still spans [0, 0, 4, 4]; IoU 9/23 = 0.39.
    assert _admissible(canvas, square, 1, 1, cfg)
    assert not _admissible(canvas, square, 1, 1, ClutterConfig(size=32, min_visible=0.4, max_iou=0.35))
    assert not _admissible(canvas, square, 0, 0, ClutterConfig(size=32, min_visible=0.0, max_iou=1.0))  # A would vanish


def test_boxes_tight_to_visible_pixels_and_occlusion_bounded():
    cfg = ClutterConfig(size=96)
    pool, photos = load_pool("train"), load_photos()
    sides, occluded, objects = [], 0, 0
    for i in range(8):
        scene = make_clutter(np.random.default_rng(i), pool, photos, cfg)
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
        assert not (scene.masks.sum(0) > 1).any()  # visible masks never overlap
        for k, (x1, y1, x2, y2) in enumerate(scene.boxes.tolist()):
            mask, pasted = scene.masks[k], scene.pasted[k]
            inside = mask[y1:y2, x1:x2]
            assert inside.sum() == mask.sum() > 0  # the visible mask lies inside its box ...
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # ... tightly
            assert not (mask & ~pasted).any() and mask.sum() >= cfg.min_visible * pasted.sum()
            rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
            sides.append(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)
            occluded += int(mask.sum() < pasted.sum())
        if len(scene.boxes) > 1:
            boxes = scene.boxes.astype(np.float64)
            assert max(box_iou(b, np.delete(boxes, k, 0)).max() for k, b in enumerate(boxes)) <= cfg.max_iou
        objects += len(scene.boxes)
        assert set(scene.labels.tolist()) <= set(range(20))
    assert objects >= 8 * 8 and occluded >= objects // 10
    # Paste masks (outline included) span small to large: tiles are MIN_SIDE..0.45 * 96 (+2 px outline).
    assert min(sides) <= 2 * MIN_SIDE and max(sides) >= 0.3 * 96 and max(sides) <= round(0.45 * 96) + 2


def test_full_visibility_means_no_occlusion_and_negatives(tmp_path):
    summary = generate_clutter(tmp_path / "v", 3, 0, size=64, seed=2, min_visible=1.0)
    assert summary["train"]["occluded"] == 0 and summary["train"]["objects"] > 0
    summary = generate_clutter(tmp_path / "n", 3, 0, size=64, seed=2, negative_fraction=1.0)
    assert summary["train"] == {"images": 3, "objects": 0, "negatives": 3, "occluded": 0}


def test_pools_have_twenty_classes_and_are_disjoint():
    train, val = load_pool("train"), load_pool("val")
    assert len(train.tiles) == len(val.tiles) == 20
    assert [len(t) for t in train.tiles] == [160] * 20 and [len(t) for t in val.tiles] == [40] * 20
    for t, v in zip(train.tiles, val.tiles):
        seen = {x.tobytes() for x in t} | {np.ascontiguousarray(x[:, ::-1]).tobytes() for x in t}
        assert not any(x.tobytes() in seen for x in v)
    assert all(p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 300 for p in load_photos())


def test_cli_writes_clutter(tmp_path):
    result = invoke("data", "clutter", tmp_path / "c", "--train", 2, "--val", 1, "--size", 64, "--seed", 3)
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "c" / "train.json").read_text())
    assert len(train["images"]) == 2 and len(train["categories"]) == 20
    assert all((tmp_path / "c" / "images" / im["file_name"]).is_file() for im in train["images"])
    line = one_error_line(invoke("data", "clutter", tmp_path / "c", "--train", 2, "--val", 1, "--size", 64))
    assert "exists and is not empty" in line and str(tmp_path / "c") in line


def test_cli_output_below_a_file_is_refused(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    line = one_error_line(invoke("data", "clutter", blocker / "out", "--train", 2, "--val", 1, "--size", 64))
    assert f"cannot be created, {blocker} is a file" in line
    assert blocker.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("args, message", [
    (["--size", 16], "size must be >= 32"),
    (["--train", -1], "image counts must be >= 0"),
    (["--min-objects", 5, "--max-objects", 2], "min_objects <= max_objects"),
    (["--min-visible", 1.5], "min_visible must be in [0, 1]"),
])
def test_cli_bad_arguments_one_line(tmp_path, args, message):
    line = one_error_line(invoke("data", "clutter", tmp_path / "x", "--size", 64, *args))
    assert message in line
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


def test_invalid_settings_from_python(tmp_path):
    with pytest.raises(ConfigError, match="max_scale"):
        generate_clutter(tmp_path / "x", 1, 1, size=32, min_scale=0.05, max_scale=0.2)


def test_notice_covers_clutter_assets():
    notice = (Path(__file__).parents[1] / "distill" / "data" / "assets" / "NOTICE.txt").read_text()
    assert "animal-mnist" in notice and "SinaSR-6" in notice and "Apache-2.0" in notice
    for photo in ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field"):
        assert f"\n{photo}: {photo}." in notice
