"""Teacher caches of sparse teachers: every query row and the teacher's matches, exact like the dense cache."""
import json

import pytest
import torch
import yaml
from cli_helpers import invoke, one_error_line
from tolerances import FP32_NETWORK
from toy_query import ToyQuery  # noqa: F401  registers the query detector

import distill
from distill.checkpoint import save_checkpoint
from distill.data import DetectionTransform, collate, generate_scenes, load_dataset
from distill.engine.distiller import distillation_terms, loss_keys
from distill.errors import CheckpointError, ConfigError
from distill.inputs import DistillInputs
from students import create_student
from teachers import CacheSpec, TeacherCache, build_cache, load_teacher
from teachers.cache_select import spec_from_recipe

SIZE = 64
QUERIES = CacheSpec(head_regions=(), feature_regions=(), queries=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("qcache")
    generate_scenes(root / "data", num_train=8, num_val=4, size=SIZE, seed=1)
    train = load_dataset(root / "data", "train", DetectionTransform(SIZE))
    for name, seed in (("teacher", 1), ("other", 2)):
        torch.manual_seed(seed)
        toy = create_student("toy_query", num_classes=len(train.classes))
        with torch.no_grad():  # spread the head so that logits and boxes differ per query
            for p in toy.mlp.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        save_checkpoint(root / f"{name}.safetensors", toy, {"student": toy.config, "classes": list(train.classes), "image_size": SIZE})
    build_cache(load_teacher(root / "teacher.safetensors"), load_dataset(root / "data", "train", DetectionTransform(SIZE, hflip_prob=0.5)),
                root / "cache", QUERIES, shard_size=3, batch_size=2, show_progress=False)
    return root


@pytest.fixture(scope="module")
def train_set(root):
    return load_dataset(root / "data", "train", DetectionTransform(SIZE, hflip_prob=0.5))


def student_side(batch):
    torch.manual_seed(3)
    student = create_student("toy_query", num_classes=10)
    preds = student.head(student.features(batch.images), batch.image_sizes)
    _, matches = student.loss(preds, batch.targets, batch.image_sizes)
    return student, DistillInputs(student.spec, preds, None, matches, batch.image_sizes)


LOSSES = [("kd", "gt_bridged", {}), ("box", "gt_bridged", {}), ("kd", "teacher_set", {}), ("box", "teacher_set", {})]


@pytest.mark.parametrize("flips", [(False,) * 4, (False, True, True, False)], ids=["none", "mixed"])
def test_query_rows_and_matches_equal_the_online_teacher(root, train_set, flips):
    cache, teacher = TeacherCache.open(root / "cache"), load_teacher(root / "teacher.safetensors")
    assert cache.kind == "queries" and cache.spec.family == "sparse" and cache.spec == teacher.spec
    batch = collate([train_set.get(i, f) for i, f in enumerate(flips)], pad_to=cache.canvas)
    student, s_in = student_side(batch)
    online = teacher.inputs(batch, s_in, frozenset({"head", "matches"}))
    cached = cache.inputs(batch, s_in, frozenset({"head", "matches"}))
    # The build ran the teacher on batches of 2, the online teacher here on 4: other fp32 kernels, ≤ FP32_NETWORK
    # apart (tests/tolerances.py). Logits are stored in fp16: equal or adjacent fp16 numbers, ≤ one fp16 ulp
    # ≤ 2^-10 |x| ≤ rtol 1e-3 |x| (atol 2e-3 for |x| < 2); boxes in fp32: within FP32_NETWORK of the canvas.
    torch.testing.assert_close(cached.predictions.logits, online.predictions.logits.half().float(), rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(cached.predictions.boxes, online.predictions.boxes, rtol=FP32_NETWORK, atol=FP32_NETWORK * SIZE)
    assert torch.equal(cached.predictions.valid, online.predictions.valid)
    for b in range(4):
        assert torch.equal(cached.matches.pred_index[b], online.matches.pred_index[b])
        assert torch.equal(cached.matches.gt_index[b], online.matches.gt_index[b])
    losses = [distill.create_loss(name, pairer=pairer, **params) for name, pairer, params in LOSSES]
    from_cache = distillation_terms(losses, loss_keys(losses), s_in, cached, batch.targets)
    from_teacher = distillation_terms(losses, loss_keys(losses), s_in, online, batch.targets)
    for key in from_cache:
        assert float(from_cache[key].detach()) > 0 and from_cache[key].requires_grad, key
        # fp16 logits: rel 2e-3 ≈ 4 · u16, as for the dense cache (tests/test_cache.py's docstring)
        assert float(from_cache[key].detach()) == pytest.approx(float(from_teacher[key].detach()), rel=2e-3), key


def test_query_cache_refuses_what_it_cannot_serve(root, train_set):
    cache = TeacherCache.open(root / "cache")
    teacher = load_teacher(root / "teacher.safetensors")
    student = create_student("toy_query", num_classes=10)
    cache.check_run(teacher, train_set, [distill.create_loss("kd", pairer="gt_bridged")], 32, student)
    with pytest.raises(CheckpointError, match="query rows and matches"):
        cache.check_run(teacher, train_set, [distill.create_loss("feature", pairer="gt_boxes")], 32, student)
    with pytest.raises(CheckpointError, match="another teacher .teacher.weights_sha256"):
        cache.check_run(load_teacher(root / "other.safetensors"), train_set, [], 32, student)
    with pytest.raises(ConfigError, match="sparse teacher is cached as query rows"):
        build_cache(teacher, train_set, root / "wrong", CacheSpec(), show_progress=False)
    with pytest.raises(ConfigError, match="takes no head or feature regions"):
        CacheSpec(queries=True)


def write_recipe(path):
    recipe = {
        "name": "toy-distill", "kind": "distill", "purpose": "test", "student": {"name": "toy_query", "params": {}},
        "data": {"image_size": SIZE}, "train": {"epochs": 1, "batch_size": 4, "lr": 0.005, "warmup_steps": 0, "seed": 0},
        "eval": {"batch_size": 4}, "teacher": {"min_ap": 0.0},
        "losses": [{"name": "kd", "pairer": "gt_bridged"}, {"name": "box", "pairer": "teacher_set"}],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_detkd_cache_and_distill_from_it_equal_the_online_run(root, tmp_path):
    recipe = write_recipe(tmp_path / "toy.yaml")
    assert spec_from_recipe(__import__("recipes").load_recipe(str(recipe))).queries
    common = ["--teacher", str(root / "teacher.safetensors"), "--data", str(root / "data"), "--no-progress"]
    built = invoke("cache", str(root / "teacher.safetensors"), "--data", str(root / "data"), "--out", str(tmp_path / "c"), "--recipe", str(recipe), "--no-progress")
    assert built.exit_code == 0, built.output
    runs = {}
    for name, extra in (("online", []), ("cached", ["--cache", str(tmp_path / "c")])):
        result = invoke("distill", str(recipe), *common, "--out", str(tmp_path / name), *extra)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = next(r for r in records if r.get("step") == 0 and "loss" in r)
    for key in ("loss_kd_gt_bridged", "loss_box_teacher_set", "loss_cls"):
        assert runs["cached"][key] == pytest.approx(runs["online"][key], rel=2e-3), key  # fp16 logits, as above
    bad = invoke("cache", str(root / "teacher.safetensors"), "--data", str(root / "data"), "--out", str(tmp_path / "d"), "--regions", "main", "--no-progress")
    assert bad.exit_code == 2 and "sparse teacher" in one_error_line(bad)
