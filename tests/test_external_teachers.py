"""Teachers that are not detkd runs: torchvision and transformers detectors through ``--teacher``.

Tiny random models of every supported kind are saved the way a user saves them (a state-dict file,
a ``save_pretrained`` folder), loaded by reference, and distilled into a GFL and an ASAG student
through ``detkd distill`` for one short epoch (64 px, 8 images, batch 4).
"""
import json
import pickle

import pytest
import torch
import yaml
from cli_helpers import SMALL, invoke, make_scenes, one_error_line

from distill.data.scenes import CLASSES
from distill.structures import Batch, Target
from teachers import load_teacher
from teachers.external.common import softmax_to_logits
from teachers.external.torchvision import build_torchvision

NAMES = ["__background__", *CLASSES]  # torchvision label ids: 0 is the background

GFL = {"name": "gfl", "params": {"backbone": "resnet10t", "fpn_channels": 16, "head_convs": 1}}
ASAG = {"name": "asag_s", "params": {
    "backbone": "resnet10t", "strides": [8, 16, 32], "fpn_channels": 32, "num_queries": 20, "num_heads": 4, "ffn_dim": 64,
    "dynamic_dim": 16, "roi_canonical": 64.0, "box_head": "bins"}}
# The terms each student reads from each kind of teacher (what its spec allows: dense grid pairs only
# from a dense teacher on the student's strides, feature maps only at strides the teacher has).
DENSE_TERMS = [
    {"name": "kd", "weight": 1.0, "pairer": "main", "params": {"temperature": 2, "mode": "bce"}},
    {"name": "kd", "weight": 0.5, "pairer": "teacher_set", "pairer_params": {"top_k": 20}},
    {"name": "box", "weight": 1.0, "pairer": "gt_bridged"},
    {"name": "feature", "weight": 1.0, "pairer": "gt_boxes"},
]
MATCHED_TERMS = [
    {"name": "kd", "weight": 1.0, "pairer": "gt_bridged"},
    {"name": "box", "weight": 1.0, "pairer": "gt_bridged"},
    {"name": "kd", "weight": 0.5, "pairer": "teacher_set", "pairer_params": {"top_k": 20}},
]
SHARED = {"name": "kd", "weight": 0.5, "pairer": "shared_queries", "pairer_params": {"top_k": 10}}
FEATURE = {"name": "feature", "weight": 1.0, "pairer": "gt_boxes"}


def recipe_file(path, student, losses):
    recipe = {
        "name": path.stem, "kind": "distill", "purpose": "external-teacher test", "student": student, "teacher": {"min_ap": 0.0},
        "data": {"image_size": 64}, "train": {"epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 0.002, "seed": 0},
        "losses": losses,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes") / "data")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny random teachers saved as users save them: {kind: teacher reference}."""
    root = tmp_path_factory.mktemp("teachers")
    (root / "names.json").write_text(json.dumps(NAMES))
    refs = {}
    torch.manual_seed(0)
    for arch in ("fcos_resnet18_fpn", "retinanet_resnet18_fpn", "fasterrcnn_resnet18_fpn"):
        model = build_torchvision(arch, len(NAMES), norm_layer=torch.nn.BatchNorm2d)
        suffix = ".safetensors" if arch.startswith("retina") else ".pth"
        if suffix == ".pth":
            torch.save(model.state_dict(), root / f"{arch}.pth")
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / f"{arch}{suffix}"))
        refs[arch.split("_")[0]] = f"tv:{arch}={root / (arch + suffix)},classes={root / 'names.json'}"
    for kind, model in hf_models().items():
        model.save_pretrained(root / kind)
        refs[kind] = str(root / kind)
    return refs


def hf_models() -> dict:
    """Tiny DETR-family models of the installed transformers (random, nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    labels = {"num_labels": len(CLASSES), "id2label": dict(enumerate(CLASSES)), "label2id": {n: i for i, n in enumerate(CLASSES)}}
    layers = {"encoder_layers": 1, "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
              "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "num_queries": 10}

    def resnet(*stages):
        return transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], out_features=list(stages))

    configs = {
        "detr": lambda: transformers.DetrConfig(
            use_timm_backbone=False, backbone_config=resnet("stage4"), use_pretrained_backbone=False, d_model=32, auxiliary_loss=True, **layers, **labels),
        "conditional_detr": lambda: transformers.ConditionalDetrConfig(
            use_timm_backbone=False, backbone_config=resnet("stage4"), use_pretrained_backbone=False, d_model=32, **layers, **labels),
        "dab-detr": lambda: transformers.DabDetrConfig(
            use_timm_backbone=False, backbone_config=resnet("stage4"), use_pretrained_backbone=False, hidden_size=32, **layers, **labels),
        "deformable_detr": lambda: transformers.DeformableDetrConfig(
            use_timm_backbone=False, backbone_config=resnet("stage2", "stage3", "stage4"), use_pretrained_backbone=False, d_model=32, **layers, **labels),
        "rt_detr": lambda: transformers.RTDetrConfig(
            backbone_config=transformers.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"]),
            use_pretrained_backbone=False, d_model=32, encoder_hidden_dim=32, encoder_in_channels=[16, 16, 32], decoder_in_channels=[32, 32, 32],
            encoder_ffn_dim=32, decoder_layers=2, decoder_ffn_dim=32, num_queries=10, num_denoising=0, encoder_attention_heads=2,
            decoder_attention_heads=2, **labels),
        # D-FINE: RT-DETR's encoder with fine-grained distribution refinement of the boxes; a tiny HGNetV2
        "d_fine": lambda: transformers.DFineConfig(
            backbone_config=transformers.HGNetV2Config(
                embedding_size=8, stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 16, 32], stage_mid_channels=[8, 8, 8, 8],
                stage_out_channels=[16, 16, 32, 32], stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1],
                hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"]),
            use_pretrained_backbone=False, d_model=32, encoder_hidden_dim=32, encoder_in_channels=[16, 32, 32], decoder_in_channels=[32, 32, 32],
            encoder_ffn_dim=32, decoder_ffn_dim=32, decoder_layers=2, num_queries=10, num_denoising=0, encoder_attention_heads=2,
            decoder_attention_heads=2, decoder_n_points=2, head_dim=16, **labels),
    }
    torch.manual_seed(0)
    return {kind: transformers.AutoModelForObjectDetection.from_config(make()) for kind, make in configs.items()}


def batch(images: int = 2) -> Batch:
    targets = [Target(torch.tensor([[5.0, 6.0, 30.0, 40.0]]), torch.tensor([3])), Target.empty()][:images]
    return Batch(torch.randn(images, 3, 64, 64), targets, list(range(images)), torch.tensor([[64, 64], [64, 48]])[:images],
                 torch.ones(images), torch.zeros(images, dtype=torch.bool))


def distill(tmp_path, data, teacher, student, losses, name):
    recipe = recipe_file(tmp_path / f"{name}.yaml", student, losses)
    result = invoke("distill", recipe, "--teacher", teacher, "--data", data, "--out", tmp_path / name, *SMALL, "--force", "--device", "cpu")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return set().union(*steps), json.loads((tmp_path / name / "run.json").read_text())


# ------------------------------------------------------------------------------- conversions
def test_softmax_probabilities_become_logits_whose_sigmoid_is_that_probability():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -1.0, 1.0]])  # last column: no object
    per_class = softmax_to_logits(logits, background=-1)
    assert per_class.shape == (2, 3)
    torch.testing.assert_close(per_class.sigmoid()[0], torch.full((3,), 0.25))
    torch.testing.assert_close(per_class.sigmoid()[1], logits[1].softmax(-1)[:3])
    # background first (Faster R-CNN): column 0 dropped
    torch.testing.assert_close(softmax_to_logits(logits, background=0).sigmoid()[1], logits[1].softmax(-1)[1:])


@pytest.mark.parametrize("kind", ["rt_detr", "d_fine"])
def test_sigmoid_detrs_pass_their_logits_and_boxes_through(saved, kind):
    """RT-DETR / D-FINE score classes with sigmoids (no "no object" column): the teacher's logits are
    the model's own, its boxes the model's normalised (cx, cy, w, h) times the canvas, as xyxy pixels."""
    teacher = load_teacher(saved[kind])
    images = batch().images  # (2, 3, 64, 64); a folder without preprocessor_config.json: ImageNet normalisation, as detkd's
    with torch.no_grad():
        predictions = teacher.model.head(teacher.model.features(images), batch().image_sizes)
        out = teacher.model.model(pixel_values=images)
    assert teacher.model.softmax is False and predictions.logits.shape == (2, 10, len(CLASSES))
    assert torch.equal(predictions.logits, out.logits)  # same forward, same process: same bits
    cx, cy, w, h = out.pred_boxes.unbind(-1)
    # the wrapper runs these very fp32 ops, so equality is expected; 1e-5 px is below one fp32 ulp at 64 px (7.6e-6 x 2)
    torch.testing.assert_close(predictions.boxes, torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * 64, rtol=0, atol=1e-5)
    assert teacher.spec.family == "sparse" and teacher.spec.strides == (8, 16, 32)  # the encoder's three levels as feature maps


def test_fcos_scores_are_torchvisions_sqrt_of_class_times_centerness(saved):
    teacher = load_teacher(saved["fcos"])
    images = batch().images
    with torch.no_grad():
        features = teacher.model.features(images)
        raw = teacher.model.model.head(features)
        predictions = teacher.model.head(features, batch().image_sizes)
    expected = (raw["cls_logits"].sigmoid() * raw["bbox_ctrness"].sigmoid()).sqrt()
    # the wrapper stores logit(p) and sigmoid brings p back: fp32 log / log1p / exp, a few u amplified by
    # |logit| <= ~17 (p within fp32 of 0 or 1): < 1e-5 relative; 1e-4 / 1e-6 abs leave x10 on any CPU
    torch.testing.assert_close(predictions.logits.sigmoid(), expected, rtol=1e-4, atol=1e-6)
    assert predictions.bins is None and predictions.logits.shape[1] == 8 * 8 + 4 * 4 + 2 * 2 + 1 + 1


# ------------------------------------------------------------------------------------ frozen
@pytest.mark.parametrize("kind", ["fcos", "retinanet", "fasterrcnn", "detr", "deformable_detr"])
def test_external_teacher_is_frozen_and_maps_its_classes(saved, kind):
    teacher = load_teacher(saved[kind])
    # FCOS / RetinaNet have a (sigmoid) column for every label id; Faster R-CNN's softmax background is dropped
    assert teacher.classes == (NAMES if kind in ("fcos", "retinanet") else list(CLASSES))
    assert teacher.meta["path"].startswith("tv:" if kind in ("fcos", "retinanet", "fasterrcnn") else "hf:")
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    teacher.model.train()  # pinned: stays in eval mode
    inputs = teacher.inputs(batch(), None, frozenset({"head", "features", "matches"}))
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    p = inputs.predictions
    assert p.logits.shape[-1] == len(teacher.classes) and p.boxes.shape[:2] == p.logits.shape[:2] and not p.logits.requires_grad
    assert [len(i) for i in inputs.matches.pred_index] == [1, 0]  # one GT in image 0, none in image 1
    assert teacher.spec.family == ("dense" if kind in ("fcos", "retinanet") else "sparse")
    assert [f.shape[-1] for f in inputs.features] == [-(-64 // s) for s in teacher.spec.strides]  # stride-2 convs round up


def test_a_model_object_is_a_teacher_too():
    model = build_torchvision("fcos_resnet18_fpn", len(NAMES))
    teacher = load_teacher(model, classes=NAMES)
    assert teacher.classes == NAMES and teacher.spec.strides == (8, 16, 32, 64, 128) and teacher.spec.fpn_channels == 256


def test_class_map_reindexes_columns_and_the_ap_gate_sees_dataset_labels(saved):
    import teachers.frozen as frozen

    teacher = load_teacher(saved["detr"])
    teacher.class_index = torch.tensor([3, 1])  # student class 0 = teacher "Dress", 1 = "Trouser"
    view = teacher.detector
    images = batch().images
    with torch.no_grad():
        full = teacher.model.head(teacher.model.features(images), None)
        mapped = view.head(view.features(images), None)
    assert isinstance(view, frozen.ClassMapped)
    torch.testing.assert_close(mapped.logits, full.logits[..., [3, 1]])
    assert all(torch.equal(a.logits, f.logits[..., [3, 1]]) for a, f in zip(mapped.aux, full.aux)) and len(full.aux) == 1


# ------------------------------------------------------------------------------ distillation
@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_gfl_student_distills_from_a_dense_torchvision_teacher(saved, data, tmp_path, kind):
    keys, run = distill(tmp_path, data, saved[kind], GFL, DENSE_TERMS, f"gfl-{kind}")
    assert {"loss_kd_main", "loss_kd_teacher_set", "loss_box_gt_bridged", "loss_feature_gt_boxes"} <= keys
    assert run["teacher"]["path"] == saved[kind] and "AP" in run["teacher"]["val"]


def test_asag_student_distills_from_faster_rcnn_with_decoded_shared_queries(saved, data, tmp_path):
    # Faster R-CNN's box head runs on given boxes: shared queries with random boxes reach it.
    shared = {**SHARED, "pairer_params": {"top_k": 10, "random": 4}}
    keys, _ = distill(tmp_path, data, saved["fasterrcnn"], ASAG, [*MATCHED_TERMS, shared, FEATURE], "asag-frcnn")
    assert {"loss_kd_gt_bridged", "loss_box_gt_bridged", "loss_kd_teacher_set", "loss_kd_shared_queries", "loss_feature_gt_boxes"} <= keys


@pytest.mark.parametrize("kind", ["detr", "conditional_detr", "dab-detr", "deformable_detr", "rt_detr", "d_fine"])
def test_asag_student_distills_from_a_transformers_detr(saved, data, tmp_path, kind):
    keys, run = distill(tmp_path, data, saved[kind], ASAG, [*MATCHED_TERMS, SHARED], f"asag-{kind}")
    assert {"loss_kd_gt_bridged", "loss_box_gt_bridged", "loss_kd_teacher_set", "loss_kd_shared_queries"} <= keys
    assert run["teacher"]["path"].startswith("hf:/")


def test_asag_student_imitates_deformable_detr_encoder_maps(saved, data, tmp_path):
    keys, _ = distill(tmp_path, data, "hf:" + saved["deformable_detr"], ASAG, [MATCHED_TERMS[0], FEATURE], "asag-deform-feat")
    assert {"loss_kd_gt_bridged", "loss_feature_gt_boxes"} <= keys


def test_gfl_student_distills_from_rt_detr(saved, data, tmp_path):
    keys, _ = distill(tmp_path, data, saved["rt_detr"], GFL, MATCHED_TERMS, "gfl-rtdetr")
    assert {"loss_kd_gt_bridged", "loss_kd_teacher_set"} <= keys


def test_teacher_weights_unchanged_and_gradients_only_in_the_student(saved, data, tmp_path, monkeypatch):
    import teachers

    loaded = []

    def recording(reference, classes=None):
        loaded.append(load_teacher(reference, classes))
        return loaded[-1]

    monkeypatch.setattr(teachers, "load_teacher", recording)
    before = None
    distill(tmp_path, data, saved["fcos"], GFL, DENSE_TERMS, "frozen-check")
    teacher = loaded[0]
    before = load_teacher(saved["fcos"]).model.state_dict()
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert not any(isinstance(v, torch.nn.Module) for v in vars(teacher).values() if v is not teacher.model)


# ---------------------------------------------------------------------------------- refusals
def test_unmatched_classes_missing_file_payload_and_wrong_task_are_one_line(saved, data, tmp_path):
    recipe = recipe_file(tmp_path / "r.yaml", GFL, DENSE_TERMS[:1])
    base = ["distill", recipe, "--data", data, *SMALL, "--force"]
    # no class names: the ids "0".."10" match no dataset class
    unnamed = saved["fcos"].split(",classes=")[0]
    line = one_error_line(invoke(*base, "--teacher", unnamed, "--out", tmp_path / "a"))
    assert "has no class" in line and "T-shirt/top" in line and "class_map" in line
    assert not (tmp_path / "a").exists()
    # the recipe's teacher.class_map (dataset class -> teacher name) can name the ids instead
    from teachers import class_index_for

    unnamed_classes = load_teacher(unnamed).classes
    assert unnamed_classes == [str(i) for i in range(11)]
    assert class_index_for(list(CLASSES), unnamed_classes, {name: str(i + 1) for i, name in enumerate(CLASSES)}) == list(range(1, 11))
    # missing weights
    line = one_error_line(invoke(*base, "--teacher", "tv:fcos_resnet18_fpn=" + str(tmp_path / "nope.pth"), "--out", tmp_path / "b"))
    assert "nope.pth" in line and "not found" in line
    # a pickle whose unpickling would run code
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.pth"
    bad.write_bytes(pickle.dumps({"head.classification_head.cls_logits.weight": Payload()}))
    result = invoke(*base, "--teacher", f"tv:fcos_resnet18_fpn={bad}", "--out", tmp_path / "c")
    line = one_error_line(result)
    assert "bad.pth" in line and "refused" in line and "pwned" not in result.output
    # an unknown architecture, and a transformers model of another task
    line = one_error_line(invoke(*base, "--teacher", f"tv:ssd300_vgg16={bad}", "--out", tmp_path / "d"))
    assert "unknown torchvision detection architecture" in line
    transformers = pytest.importorskip("transformers")
    classifier = transformers.ResNetForImageClassification(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1]))
    classifier.save_pretrained(tmp_path / "classifier")
    line = one_error_line(invoke(*base, "--teacher", tmp_path / "classifier", "--out", tmp_path / "e"))
    assert "model type 'resnet' is not a supported object-detection model" in line


def test_class_name_table_with_ids(saved, tmp_path):
    # {id: name}: only the listed ids are named; the others keep their id as name
    table = tmp_path / "names.yaml"
    table.write_text(yaml.safe_dump({i + 1: n for i, n in enumerate(CLASSES[:3])}))
    teacher = load_teacher(saved["fcos"].split(",classes=")[0] + f",classes={table}")
    assert teacher.classes == ["0", *CLASSES[:3], *[str(i) for i in range(4, 11)]]


# ------------------------------------------------------------------------------- cache, eval
def test_query_cache_of_a_transformers_teacher_serves_a_distillation(saved, data, tmp_path):
    recipe = recipe_file(tmp_path / "cached.yaml", ASAG, MATCHED_TERMS)
    result = invoke("cache", saved["deformable_detr"], "--data", data, "--out", tmp_path / "cache", "--recipe", recipe,
                    "--set", "data.image_size=64", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = invoke("distill", recipe, "--teacher", saved["deformable_detr"], "--data", data, "--out", tmp_path / "run",
                    "--cache", tmp_path / "cache", *SMALL, "--force", "--device", "cpu")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["teacher"]["cache"]["key"] and run["teacher"]["path"] == "hf:" + saved["deformable_detr"]


def test_dense_torchvision_teacher_caches_feature_rows_only(saved, data, tmp_path):
    # no box bins to store: head rows are refused with one line, nothing written ...
    line = one_error_line(invoke("cache", saved["fcos"], "--data", data, "--out", tmp_path / "cache", "--image-size", 64, "--regions", "main", "--no-progress"))
    assert "no box bins" in line and not (tmp_path / "cache").exists()
    # ... while what the recommended pkd reads (no --recipe: the feature rows of every valid location) is cached
    result = invoke("cache", saved["fcos"], "--data", data, "--out", tmp_path / "features", "--image-size", 64, "--no-progress")
    assert result.exit_code == 0, result.output
    selection = json.loads((tmp_path / "features" / "manifest.json").read_text())["fingerprint"]["selection"]
    assert selection["head"] == [] and [r["name"] for r in selection["features"]] == ["all"]


def test_eval_scores_an_external_teacher_in_the_datasets_classes(saved, data, tmp_path):
    from distill.data import DetectionTransform, load_dataset
    from distill.engine.evaluate import evaluate_detector
    from teachers.external import detector_for_data, parse_reference

    result = invoke("eval", saved["fasterrcnn"], "--data", data, "--image-size", 64, "--out", tmp_path / "e.json", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    dataset = load_dataset(data, "val", DetectionTransform(64, hflip_prob=0.0))
    expected = evaluate_detector(detector_for_data(parse_reference(saved["fasterrcnn"]), dataset.classes), dataset)
    assert json.loads((tmp_path / "e.json").read_text())["metrics"] == expected
    line = one_error_line(invoke("eval", saved["fasterrcnn"], "--data", data, "--no-progress"))
    assert "--image-size" in line


def test_benchmark_row_fits_a_torchvision_fcos_teacher():
    """benchmarks/external_teacher.py: its distilled row's recipe passes every pair check with the
    FCOS it trains (class map by name, features at the student's strides)."""
    import importlib.util
    import sys
    from pathlib import Path

    from distill.engine.build import build_detector
    from distill.engine.run import build_losses
    from teachers import check_pair, class_index_for

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("external_teacher", folder / "external_teacher.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        row = next(r for r in bench.ROWS if r.teacher)
        recipe = bench.row_recipe(row, ["data.image_size=64"])
    finally:
        sys.path.remove(str(folder))
    teacher = load_teacher(build_torchvision(bench.ARCH, len(NAMES)), classes=NAMES)
    teacher.class_index = torch.tensor(class_index_for(list(CLASSES), teacher.classes))
    student = build_detector(recipe, num_classes=len(CLASSES))
    losses = build_losses(recipe, student, teacher)
    check_pair(student.spec, teacher.spec, losses)
    assert [loss.name for loss in losses] == ["kd", "feature"] and teacher.class_index.tolist() == list(range(1, 11))
