"""``detkd export --format onnx``: every exportable family traced with its postprocess, checked by
onnx.checker and run by onnxruntime (CPU) against PyTorch on scene images, at batch 1 and, from the same
file exported at batch 1, at batch 3; the traps (opset < 16, a data-dependent anchor count, files
detkd did not write) refused in one line."""
import json

import pytest
import torch
import yaml

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cli_helpers import invoke, one_error_line  # noqa: E402
from export_helpers import assert_same_detections  # noqa: E402
from tolerances import fp32_chain  # noqa: E402

from distill.checkpoint import save_checkpoint  # noqa: E402
from distill.data import DetectionTransform, collate, generate_scenes, load_dataset  # noqa: E402
from distill.export import load_session, run_session  # noqa: E402
from recipes import __file__ as recipes_init  # noqa: E402
from students import create_student  # noqa: E402
from students.saved import load_detector  # noqa: E402

SIZE = 64
RECIPES = ["gfl-tiny", "asag-s-tiny", "sparse6-tiny", "dab6-tiny"]
# Box refinements chained in the inference path: the dense head decodes once; a query detector's
# every stage (proposal block / decoder layer) reads the previous one's boxes.
DEPTH = {"gfl-tiny": 1, "asag-s-tiny": 2, "sparse6-tiny": 7, "dab6-tiny": 6}


def tolerance(recipe: str) -> float:
    """Relative error of one small network (~200 fp32 roundings, tests/tolerances.py FP32_NETWORK) per
    chained stage: onnxruntime and PyTorch run different kernels (other sum orders, fused ops)."""
    return fp32_chain(200 * DEPTH[recipe])


def student(recipe: str, classes: list[str], seed: int = 0, **overrides):
    """The recipe's student, random init with heads spread (the prior alone scores every pair alike)."""
    from pathlib import Path

    spec = yaml.safe_load((Path(recipes_init).parent / f"{recipe}.yaml").read_text())["student"]
    torch.manual_seed(seed)
    model = create_student(spec["name"], **{**spec["params"], "num_classes": len(classes), **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    generate_scenes(root / "data", num_train=4, num_val=4, size=SIZE, seed=4)
    return root


@pytest.fixture(scope="module")
def scenes(root):
    val = load_dataset(root / "data", "val", DetectionTransform(SIZE, hflip_prob=0.0))
    return val


@pytest.fixture(scope="module", params=RECIPES)
def exported(request, root, scenes):
    """(recipe, checkpoint, onnx file) exported with --dynamic-batch (traced at batch 1)."""
    recipe = request.param
    # GFL: a high prior so that many overlapping candidates pass the threshold and NMS does real work.
    extra = {"prior_prob": 0.3} if recipe == "gfl-tiny" else {}
    model = student(recipe, scenes.classes, **extra)
    ckpt = root / recipe / "checkpoints" / "last.safetensors"
    save_checkpoint(ckpt, model, {"student": model.config, "classes": list(scenes.classes), "image_size": SIZE})
    result = invoke("export", root / recipe, "--format", "onnx", "--dynamic-batch")
    assert result.exit_code == 0, result.output
    out = root / recipe / "export" / "student.onnx"
    assert out.is_file() and str(out) in result.output.replace("\n", "")
    return recipe, ckpt, out


def images(scenes, count: int) -> torch.Tensor:
    return collate([scenes.get(i, False) for i in range(count)], size_divisor=32).images


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_gives_pytorch_detections(exported, scenes, batch):
    recipe, ckpt, path = exported
    model, _ = load_detector(ckpt)
    x = images(scenes, batch)
    assert x.shape == (batch, 3, SIZE, SIZE)
    sizes = torch.tensor([[SIZE, SIZE]] * batch)
    with torch.no_grad():
        expected = model.postprocess(model.head(model.features(x), sizes), sizes)
    got = run_session(load_session(path), x)
    assert set(got) == {"boxes", "scores", "labels", "valid"}
    assert got["labels"].dtype.name == "int64" and got["valid"].dtype.name == "bool"
    assert_same_detections(expected, got, tolerance(recipe), SIZE)


def test_topk_larger_than_the_candidates(scenes):
    """k above the pairs of every level (P3 at 64 px: 8 x 8 locations x 10 classes = 640) and
    ``max_detections`` above all candidates together: clamped in the graph, at batch 1 and 2."""
    from distill.export import export_onnx

    model = student("gfl-tiny", scenes.classes, prior_prob=0.3, pre_nms_topk=5000, max_detections=5000, score_thresh=0.2).eval()
    session = load_session_bytes(export_onnx(model, {"image_size": SIZE}, dynamic_batch=True))
    for batch in (1, 2):
        x = images(scenes, batch)
        sizes = torch.tensor([[SIZE, SIZE]] * batch)
        with torch.no_grad():
            expected = model.postprocess(model.head(model.features(x), sizes), sizes)
        got = run_session(session, x)
        assert got["valid"].shape[1] == sum(min(5000, h * w * len(scenes.classes)) for h, w in ((8, 8), (4, 4), (2, 2), (1, 1), (1, 1)))
        assert_same_detections(expected, got, tolerance("gfl-tiny"), SIZE)


def load_session_bytes(data: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def test_file_is_checked_and_holds_only_the_inference_path(exported):
    recipe, ckpt, path = exported
    from distill.viz.compare import export_mb

    assert export_mb(ckpt.parent.parent) == path.stat().st_size / 1e6 > 1  # detkd compare finds the default --out
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    model, _ = load_detector(ckpt)
    shapes = [tuple(t.dims) for t in proto.graph.initializer]
    stored = sum(int(torch.tensor(s).prod()) if s else 1 for s in shapes)
    params = dict(model.named_parameters())
    # Training-only parts never reach the graph: ASAG-S / Sparse R-CNN's parallel head copies (all but
    # the last), DAB-DETR's extra Group DETR query groups (only group 0's anchors are read).
    training_only = sum(p.numel() for n, p in params.items() if n.startswith("heads.") and not n.startswith(f"heads.{getattr(model, 'parallel_heads', 1) - 1}."))
    if recipe == "dab6-tiny":
        assert model.groups == 2
        rows = model.query_source.num_queries
        training_only += params["query_source.box_logits"][rows:].numel()
        assert (model.query_source.num_queries * model.groups, 4) not in shapes
    inference = sum(p.numel() for p in params.values()) - training_only
    assert stored <= inference + sum(b.numel() for b in model.buffers()) + 10_000  # + small graph constants
    if recipe == "asag-s-tiny":
        assert training_only > 10_000  # three parallel copies of the decoder head are left out


def test_raw_outputs(root, scenes, tmp_path):
    model = student("gfl-tiny", scenes.classes)
    ckpt = tmp_path / "gfl.safetensors"
    save_checkpoint(ckpt, model, {"student": model.config, "classes": list(scenes.classes), "image_size": SIZE})
    result = invoke("export", ckpt, "--raw")
    assert result.exit_code == 0, result.output
    x = images(scenes, 1)
    got = run_session(load_session(tmp_path / "gfl.student.onnx"), x)
    with torch.no_grad():
        out = model.eval()(x)
    assert got["logits"].shape == tuple(out.logits.shape) and got["bin_logits"].shape == tuple(out.bin_logits.shape)
    diff = (torch.from_numpy(got["logits"]) - out.logits).abs().max().item()
    assert diff <= fp32_chain(200) * out.logits.abs().max().item()


def test_refusals_are_one_line(root, scenes, tmp_path):
    model = student("gfl-tiny", scenes.classes)
    ckpt = tmp_path / "run" / "checkpoints" / "last.safetensors"
    save_checkpoint(ckpt, model, {"student": model.config, "classes": list(scenes.classes), "image_size": SIZE})
    run = tmp_path / "run"
    assert "opset >= 16" in one_error_line(invoke("export", run, "--opset", "15"))
    assert "--opset 99: this torch" in one_error_line(invoke("export", run, "--opset", "99"))
    assert "--format 'tflite'" in one_error_line(invoke("export", run, "--format", "tflite"))
    theirs = tmp_path / "theirs.onnx"
    theirs.write_text("not ours")
    assert "not written by this command" in one_error_line(invoke("export", run, "--out", theirs))
    assert theirs.read_text() == "not ours"
    assert not (run / "export").exists()  # nothing half-written
    gen = create_student("asag_s_gen", backbone="resnet10t", strides=(8, 16, 32), fpn_channels=32, num_classes=len(scenes.classes))
    save_checkpoint(tmp_path / "gen.safetensors", gen, {"student": gen.config, "classes": list(scenes.classes), "image_size": SIZE})
    assert "data-dependent number of anchors" in one_error_line(invoke("export", tmp_path / "gen.safetensors"))
    assert "checkpoint not found" in one_error_line(invoke("export", tmp_path / "missing"))


def test_export_replaces_its_own_file(root, scenes, tmp_path):
    model = student("gfl-tiny", scenes.classes)
    ckpt = tmp_path / "gfl.safetensors"
    save_checkpoint(ckpt, model, {"student": model.config, "classes": list(scenes.classes), "image_size": SIZE})
    out = tmp_path / "student.onnx"
    assert invoke("export", ckpt, "--out", out).exit_code == 0
    first = out.read_bytes()
    result = invoke("export", ckpt, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == first  # same checkpoint, same trace: the same file
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def self_labelled(data, ckpt, out, per_image: int = 3):
    """A copy of ``data`` whose val ground truth is the checkpoint's own best ``per_image`` detections
    (random heads score ~0 AP on the real boxes: this gives metrics well inside (0, 1) to compare)."""
    import shutil

    model, _ = load_detector(ckpt)
    val = load_dataset(data, "val", DetectionTransform(SIZE, hflip_prob=0.0))
    record = json.loads((data / "val.json").read_text())
    annotations = []
    for i, image_id in enumerate(val.image_ids):
        batch = collate([val.get(i, False)])
        with torch.no_grad():
            det = model.postprocess(model.head(model.features(batch.images), batch.image_sizes), batch.image_sizes)[0]
        sides = det.boxes[:, 2:] - det.boxes[:, :2]
        keep = (sides >= 1).all(1).nonzero()[:per_image, 0]  # boxes clipped flat at the border are not GT
        for box, label in zip(det.boxes[keep].tolist(), det.labels[keep].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": val.cat_ids[label],
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
    shutil.copytree(data / "images", out / "images")
    (out / "val.json").write_text(json.dumps({**record, "annotations": annotations}))
    return out


def test_eval_of_the_onnx_file_gives_the_checkpoint_metrics(exported, root, tmp_path):
    recipe, ckpt, path = exported
    data = self_labelled(root / "data", ckpt, tmp_path / "data")
    records = {}
    for name, source in (("ckpt", ckpt), ("onnx", path)):
        out = tmp_path / f"{name}.json"
        result = invoke("eval", source, "--data", data, "--out", out, "--batch-size", 3, "--no-progress")
        assert result.exit_code == 0, result.output
        records[name] = json.loads(out.read_text())["metrics"]
    assert records["ckpt"]["AP"] > 0.1, records  # its own top boxes are found (other, higher-scored detections lower it)
    for key, value in records["ckpt"].items():
        assert round(records["onnx"][key], 3) == round(value, 3), (key, records)


def test_eval_refuses_an_onnx_file_detkd_did_not_write(root, tmp_path):
    other = tmp_path / "other.onnx"
    other.write_bytes(b"\x08\x07")
    assert "not an ONNX file written by detkd export" in one_error_line(invoke("eval", other, "--data", root / "data", "--no-progress"))
