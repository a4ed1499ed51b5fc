"""Built-in scenes: byte-determinism, tight boxes, bounded overlap, COCO validity, safe writes."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from distill.data import SCENE_CLASSES, DetectionTransform, generate_scenes, load_dataset
from distill.data.scenes import SceneConfig, load_pool, load_textures, make_scene
from distill.errors import ConfigError, DataError

SMALL = dict(num_train=8, num_val=4, size=96)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    generate_scenes(tmp_path / "a", seed=3, **SMALL)
    generate_scenes(tmp_path / "b", seed=3, **SMALL)
    generate_scenes(tmp_path / "c", seed=4, **SMALL)
    a, b, c = digests(tmp_path / "a"), digests(tmp_path / "b"), digests(tmp_path / "c")
    assert len(a) == 8 + 4 + 2 and a == b
    assert a.keys() == c.keys() and a["train.json"] != c["train.json"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) >= 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left


def test_generated_json_loads_in_pycocotools_and_detkd(tmp_path):
    summary = generate_scenes(tmp_path / "d", seed=0, **SMALL)
    coco = COCO(str(tmp_path / "d" / "val.json"))
    assert len(coco.getImgIds()) == 4
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SCENE_CLASSES)
    info = json.loads((tmp_path / "d" / "train.json").read_text())["info"]
    assert info["seed"] == 0 and info["generator"] == "distill.data.scenes.generate_scenes"
    assert "synthetic" in info["description"] and "real" in info["description"]
    train = load_dataset(tmp_path / "d", "train", DetectionTransform(96))  # validates every box
    val = load_dataset(tmp_path / "d", "val", DetectionTransform(96))
    assert train.classes == list(SCENE_CLASSES) and train.cat_ids == list(range(1, 11))
    assert set(train.image_ids).isdisjoint(val.image_ids)
    assert summary["train"]["objects"] == len(train.coco.anns) and summary["val"]["images"] == 4
    assert train[0].image.shape == (3, 96, 96)


def test_boxes_tight_and_overlap_bounded():
    cfg = SceneConfig(size=96)
    pool, textures = load_pool("train"), load_textures()
    objects = 0
    for i in range(30):
        scene = make_scene(np.random.default_rng(i), pool, textures, cfg)
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
        shown = np.zeros((96, 96), dtype=bool)  # pixels covered by objects pasted later
        for k in reversed(range(len(scene.boxes))):
            x1, y1, x2, y2 = scene.boxes[k]
            mask = scene.masks[k]
            inside = mask[y1:y2, x1:x2]
            assert inside.sum() == mask.sum()  # the mask lies inside its box ...
            # ... and touches all four sides
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert (mask & ~shown).sum() >= cfg.min_visible * mask.sum()
            shown |= mask
            for j in range(k):
                b = scene.boxes[j]
                inter = max(0, min(x2, b[2]) - max(x1, b[0])) * max(0, min(y2, b[3]) - max(y1, b[1]))
                union = (x2 - x1) * (y2 - y1) + (b[2] - b[0]) * (b[3] - b[1]) - inter
                assert inter / union <= cfg.max_iou
        objects += len(scene.boxes)
        assert set(scene.labels.tolist()) <= set(range(10))
    assert objects > 30  # most scenes hold several objects


def test_negatives_and_object_counts(tmp_path):
    summary = generate_scenes(tmp_path / "neg", 5, 0, size=64, seed=1, negative_fraction=1.0)
    assert summary["train"] == {"images": 5, "objects": 0, "negatives": 5}
    summary = generate_scenes(tmp_path / "two", 6, 0, size=96, seed=1, negative_fraction=0.0,
                              min_objects=2, max_objects=2, max_iou=1.0, min_visible=0.0)
    assert summary["train"] == {"images": 6, "objects": 12, "negatives": 0}


def test_train_and_val_pools_are_disjoint():
    train, val = load_pool("train"), load_pool("val")
    assert train.images.shape == (1200, 28, 28) and val.images.shape == (300, 28, 28)
    train_hashes = {hashlib.sha256(img.tobytes()).digest() for img in train.images}
    assert not any(hashlib.sha256(img.tobytes()).digest() in train_hashes for img in val.images)
    assert np.bincount(train.labels).tolist() == [120] * 10


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "scenes"
    out.mkdir()
    generate_scenes(out, 2, 1, size=64)  # an existing empty folder is fine
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not empty"):
        generate_scenes(out, 2, 1, size=64)
    assert (out / "keep.txt").exists()
    generate_scenes(out, 3, 1, size=64, overwrite=True)
    assert not (out / "keep.txt").exists() and len(list((out / "images").iterdir())) == 4


def test_invalid_generator_settings(tmp_path):
    with pytest.raises(ConfigError, match="min_objects"):
        generate_scenes(tmp_path / "x", 1, 1, min_objects=3, max_objects=2)
    with pytest.raises(ConfigError, match="image counts"):
        generate_scenes(tmp_path / "x", -1, 1)
    assert not (tmp_path / "x").exists()


def test_assets_have_a_notice():
    notice = (Path(__file__).parents[1] / "distill" / "data" / "assets" / "NOTICE.txt").read_text()
    assert "Zalando SE" in notice and "MIT" in notice and "CC0" in notice
