"""RefineBox (``teachers.refine``, ``detkd refine``): a box refiner trained on a frozen detector.

Unit level: top-K selection and scatter-back on literal tensors, the untrained refiner is the
identity, its parameter count by hand, a refiner trained on a toy case pulls jittered boxes to the
GT. Run level (64 px scenes, one epoch): the frozen detector's tensors bit-identical after refiner
training and the optimizer holding the refiner alone (GFL, ASAG, Sparse R-CNN, DAB-DETR); class scores untouched
and only the top-K boxes moved; a changed detector refused with one line; eval / predict / distill
of a refined run through typer's runner.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import SMALL, api_metrics, invoke, make_scenes, one_error_line, train_one_epoch
from safetensors.torch import load_file
from torchvision.ops import box_iou

from distill.errors import ConfigError
from teachers.refine.criterion import RefineCriterion
from teachers.refine.model import scatter_rows, top_k_rows
from teachers.refine.refiner import BoxRefiner, parameter_count
from teachers.refine.saved import check_params

FAMILIES = ["gfl-tiny", "asag-tiny", "sparse6-tiny", "dab6-tiny"]  # every family detkd trains: dense, one-layer, Sparse R-CNN, DAB-DETR


# ------------------------------------------------------------------------------------ unit level
def test_top_k_rows_skips_invalid_and_pads_with_keep_false():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.6]])
    valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    index, keep = top_k_rows(scores, valid, 2)
    assert index.tolist() == [[1, 3], [2, 3]] and keep.all()
    index, keep = top_k_rows(scores, valid, 9)  # K = min(k, P) = 4; image 0 has 3 valid predictions
    assert index[0, :3].tolist() == [1, 3, 0] and keep.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_scatter_rows_replaces_only_kept_rows():
    boxes = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    index = torch.tensor([[1, 3], [2, 0]])
    keep = torch.tensor([[True, False], [True, True]])
    refined = -torch.ones(2, 2, 4)
    out = scatter_rows(boxes, index, keep, refined)
    expected = boxes.clone()
    expected[0, 1] = -1.0  # (0, 3) is not kept: unchanged
    expected[1, 2] = -1.0
    expected[1, 0] = -1.0
    assert torch.equal(out, expected)


def test_untrained_refiner_returns_its_boxes_and_parameter_count():
    refiner = BoxRefiner([8, 8], [4, 8], channels=32, blocks=1, mlp_layers=1)
    # FPN: 2 x (1x1 8->32 + bias) + 2 x (3x3 32->32 + bias); bottleneck: 1x1 + 3x3 + 1x1, no bias,
    # 3 GroupNorms (weight + bias); MLP: Linear 32x32 no bias + LayerNorm; delta: Linear 32->4.
    fpn = 2 * (8 * 32 + 32) + 2 * (9 * 32 * 32 + 32)
    block = 32 * 32 + 9 * 32 * 32 + 32 * 32 + 3 * 2 * 32
    assert parameter_count(refiner) == fpn + block + (32 * 32 + 2 * 32) + (32 * 4 + 4)
    maps = refiner.maps([torch.randn(1, 8, 16, 16), torch.randn(1, 8, 8, 8)])
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 40.0], [10.0, 12.0, 50.0, 60.0]]])
    steps = refiner(maps, boxes, torch.tensor([[64, 64]]), 3)
    assert len(steps) == 3
    # zero deltas: sigmoid(logit(b)) = b, three times in fp32 on coordinates <= 64 px: each round trip is a few u
    # relative to the normalised value, < 1e-5 px; 1e-4 px holds on any CPU
    torch.testing.assert_close(steps[-1], boxes, atol=1e-4, rtol=0)


def test_bottleneck_hidden_width_by_hand():
    """``hidden`` narrows only the bottlenecks' inside: 1x1 32->8, 3x3 8->8, 1x1 8->32, GroupNorms of 8, 8, 32."""
    wide = BoxRefiner([8, 8], [4, 8], channels=32, blocks=1, mlp_layers=1)
    slim = BoxRefiner([8, 8], [4, 8], channels=32, hidden=8, blocks=1, mlp_layers=1)
    wide_block = 32 * 32 + 9 * 32 * 32 + 32 * 32 + 3 * 2 * 32
    slim_block = 32 * 8 + 9 * 8 * 8 + 8 * 32 + 2 * (2 * 8) + 2 * 32
    assert parameter_count(wide) - parameter_count(slim) == wide_block - slim_block
    assert [m.num_groups for m in slim.blocks.modules() if isinstance(m, torch.nn.GroupNorm)] == [8, 8, 32]


@pytest.mark.parametrize(("given", "hidden"), [({}, 64), ({"channels": 32}, 32), ({"channels": 32, "hidden": 8}, 8)])
def test_refiner_hidden_defaults_to_its_channels(given, hidden):
    # a checkpoint written before the setting existed has no 'hidden': it is the reference's, = channels
    assert check_params(given, "recipe.yaml")["hidden"] == hidden


def test_refiner_hidden_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match=r"^recipe.yaml: 'student.params.hidden' must be an integer >= 1, got 0$"):
        check_params({"hidden": 0}, "recipe.yaml")


def _rectangles(seed: int, images: int, per: int = 2, side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, 1, side, side) maps with ``per`` filled rectangles each, and their boxes (images, per, 4)."""
    gen = torch.Generator().manual_seed(seed)
    wh = torch.randint(14, 34, (images, per, 2), generator=gen).float()
    xy = (torch.rand(images, per, 2, generator=gen) * (side - wh)).floor()
    boxes = torch.cat([xy, xy + wh], -1)
    centres = torch.arange(side).float() + 0.5
    inside_x = (centres >= boxes[..., 0:1]) & (centres < boxes[..., 2:3])  # (images, per, side)
    inside_y = (centres >= boxes[..., 1:2]) & (centres < boxes[..., 3:4])
    image = (inside_y[..., :, None] & inside_x[..., None, :]).any(dim=1).float()[:, None]
    return image, boxes


def _jitter(boxes: torch.Tensor, gen: torch.Generator, fraction: float = 0.25) -> torch.Tensor:
    size = (boxes[..., 2:] - boxes[..., :2]).repeat(1, 1, 2)
    return boxes + (torch.rand(boxes.shape, generator=gen) * 2 - 1) * fraction * size


def test_refiner_pulls_jittered_boxes_to_the_ground_truth():
    """A toy 'detector' whose maps are the rectangles themselves (stride 4 and 8): trained 60 steps
    on 16 images, three shared-weight steps bring held-out jittered boxes (edges moved by up to 25 %
    of the side, mean IoU ~0.64) at least 0.10 IoU closer to the GT (~0.2 on our CPUs)."""
    torch.manual_seed(0)
    features = lambda image: [F.avg_pool2d(image, 4), F.avg_pool2d(image, 8)]  # noqa: E731
    image, gt = _rectangles(0, 16)
    test_image, test_gt = _rectangles(1, 16)
    test_boxes = _jitter(test_gt, torch.Generator().manual_seed(2))
    sizes = torch.tensor([[64, 64]] * 16)
    refiner = BoxRefiner([1, 1], [4, 8], channels=16, blocks=1, mlp_layers=1)
    criterion = RefineCriterion()
    optimizer = torch.optim.AdamW(refiner.parameters(), lr=5e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(3)

    def mean_iou(boxes):
        return float(box_iou(boxes.reshape(-1, 4), test_gt.reshape(-1, 4)).diag().mean())

    before = mean_iou(test_boxes)
    for _ in range(60):
        steps = refiner(refiner.maps(features(image)), _jitter(gt, gen), sizes, 3)
        losses = criterion([s.reshape(-1, 4) for s in steps], gt.reshape(-1, 4), sizes.repeat_interleave(2, 0))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(refiner.parameters(), 1.0)
        optimizer.step()
    with torch.no_grad():
        after = mean_iou(refiner(refiner.maps(features(test_image)), test_boxes, sizes, 3)[-1])
    assert 0.55 < before < 0.75
    assert after > before + 0.10, (before, after)


def test_criterion_by_hand():
    """One row, one step: a box 2 px right of a 10 x 10 GT on a 20 x 20 image."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = torch.tensor([[2.0, 0.0, 12.0, 10.0]])
    losses = RefineCriterion()([box, box], gt, torch.tensor([[20, 20]]))
    # L1 on normalised cxcywh: |dcx| = 2 / 20 per step; GIoU: IoU 80/120, enclosing = union -> 1 - 2/3.
    torch.testing.assert_close(losses["loss_l1"], torch.tensor(5.0 * 2 * 0.1))
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(2.0 * 2 * (1 - 80 / 120)))


# ------------------------------------------------------------------------------------- run level
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("refine") / "scenes")


@pytest.fixture(scope="module")
def detectors(data):
    """One-epoch detectors of the three families, trained once per module."""
    return {recipe: train_one_epoch(recipe, data, data.parent / recipe) for recipe in FAMILIES}


def refine(run, data, out, *extra):
    result = invoke("refine", run, "--data", data, "--out", out, "--epochs", 1, "--set", "train.lr=1e-3", *SMALL, *extra)
    assert result.exit_code == 0, result.output
    return result


REFINE_OUTPUT: dict[str, str] = {}  # what `detkd refine` printed, per family
HIDDEN = {"asag-tiny": 16}  # one family's refiner with slim bottlenecks, saved and loaded like the others (default: 64)


@pytest.fixture(scope="module")
def refined(detectors, data):
    runs = {}
    for recipe in FAMILIES:
        runs[recipe] = data.parent / f"{recipe}-refined"
        extra = ("--set", f"student.params.hidden={HIDDEN[recipe]}") if recipe in HIDDEN else ()
        REFINE_OUTPUT[recipe] = refine(detectors[recipe], data, runs[recipe], *extra).output
    return runs


@pytest.mark.parametrize("recipe", FAMILIES)
def test_frozen_detector_untouched_and_only_the_refiner_trained(recipe, detectors, data, tmp_path):
    from distill.engine.build import build_datasets
    from distill.engine.refine import refine_recipe
    from distill.engine.trainer import Trainer
    from students.saved import load_detector
    from teachers.refine.saved import build_refined

    detector, meta = load_detector(detectors[recipe])
    before = {k: v.clone() for k, v in detector.state_dict().items()}  # weights and BN statistics
    recipe_ = refine_recipe(meta, ["data.image_size=64", "train.batch_size=4", "train.epochs=1", "train.lr=1e-3"])
    train_set, val_set = build_datasets(recipe_, data)
    model = build_refined(detector, recipe_.student.params)
    refiner_before = {k: v.clone() for k, v in model.refiner.state_dict().items()}
    trainer = Trainer(model, recipe_, train_set, val_set, tmp_path / "run", {"student": meta["student"], "classes": meta["classes"]}, show_progress=False)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.refiner.parameters()}
    trainer.fit()
    after = detector.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not detector.training and not any(m.training for m in detector.modules())
    assert not any(p.requires_grad for p in detector.parameters())
    assert any(not torch.equal(refiner_before[k], v) for k, v in model.refiner.state_dict().items())  # it did train
    saved = tmp_path / "run" / "checkpoints" / "last.safetensors"
    assert set(load_file(str(saved))) == {f"refiner.{k}" for k in model.refiner.state_dict()}  # the refiner's weights alone


@pytest.mark.parametrize("recipe", FAMILIES)
def test_refined_run_reports_parameters_and_moves_only_top_k_boxes(recipe, refined, data):
    from distill.data import DetectionTransform, load_dataset
    from distill.data.loader import collate
    from students.saved import load_detector
    from teachers.refine.model import RefinedDetector

    info = json.loads((refined[recipe] / "run.json").read_text())
    model, _ = load_detector(refined[recipe])
    assert isinstance(model, RefinedDetector)
    assert info["kind"] == "refine" and info["refine"]["parameters"] == parameter_count(model.refiner)
    hidden = HIDDEN.get(recipe, 64)
    assert info["refine"]["params"]["hidden"] == hidden
    assert [block.body[0].out_channels for block in model.refiner.blocks] == [hidden] * 3
    assert f"refiner: {parameter_count(model.refiner):,} parameters" in " ".join(REFINE_OUTPUT[recipe].split())
    detector = model.detector  # the frozen detector inside (frozen modules may take other kernels than a plain load)
    model.top_k = 5
    detector.score_thresh = 0.0  # a one-epoch detector scores below the default threshold
    dataset = load_dataset(data, "val", DetectionTransform(64, hflip_prob=0.0))
    batch = collate([dataset.get(i, flip=False) for i in range(2)])
    with torch.no_grad():
        base = detector.head(detector.features(batch.images), batch.image_sizes)
        outputs = model.head(model.features(batch.images), batch.image_sizes)
        plain = detector.postprocess(base, batch.image_sizes)
        refined_dets = model.postprocess(outputs, batch.image_sizes)
    assert torch.equal(outputs.logits, base.logits)  # class scores untouched
    if model.family == "sparse":  # refined in the head: the top-5 queries by score, the rest unchanged
        index, _ = top_k_rows(base.logits.amax(-1), base.valid, 5)
        moved = (outputs.boxes != base.boxes).any(-1)
        assert moved.sum() > 0 and moved.scatter(1, index, False).sum() == 0
    else:  # refined after NMS: the 5 best detections of each image, the rest unchanged
        assert sum(len(det.scores) for det in plain) > 5
        for det, ref in zip(plain, refined_dets):
            assert torch.equal(det.scores, ref.scores) and torch.equal(det.labels, ref.labels)
            top = det.scores.argsort(descending=True)[:5]
            moved = (det.boxes != ref.boxes).any(-1)
            assert moved.scatter(0, top, False).sum() == 0 and (len(top) == 0 or moved[top].any())


def test_changed_detector_is_refused_with_one_line(detectors, data, tmp_path):
    import shutil

    from distill.checkpoint import read_checkpoint, save_checkpoint

    copy = tmp_path / "gfl"
    shutil.copytree(detectors["gfl-tiny"], copy)
    refine(copy, data, tmp_path / "refined")
    checkpoint = copy / "checkpoints" / "best.safetensors"
    state, meta = read_checkpoint(checkpoint)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1.0

    class Holder(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return state

    save_checkpoint(checkpoint, Holder(), {k: v for k, v in meta.items() if k not in ("format", "version")})
    line = one_error_line(invoke("eval", tmp_path / "refined", "--data", data, "--no-progress"))
    assert "changed since this refiner was trained" in line and str(checkpoint) in line
    line = one_error_line(invoke("refine", "--resume", tmp_path / "refined", "--epochs", 2, "--no-progress"))
    assert "changed since this refine run started" in line


def test_refining_a_refined_run_is_refused(refined, data, tmp_path):
    line = one_error_line(invoke("refine", refined["gfl-tiny"], "--data", data, "--out", tmp_path / "again", *SMALL))
    assert "refined run already" in line
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("recipe", ["gfl-tiny", "dab6-tiny"])
def test_eval_and_predict_of_a_refined_run(recipe, refined, data, tmp_path):
    run = refined[recipe]
    result = invoke("eval", run, "--data", data, "--out", tmp_path / "m.json", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == api_metrics(run, data)
    image = sorted((data / "images").glob("val_*.png"))[0]
    result = invoke("predict", run, image, "--out", tmp_path / "preds", "--score-thresh", 0.0)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "preds" / f"{image.stem}.pred.png").is_file()


def test_distill_from_a_refined_sparse_teacher_says_so(refined, data, tmp_path):
    out = tmp_path / "kd"
    result = invoke(
        "distill", "asag-kd-tiny", "--teacher", refined["dab6-tiny"], "--data", data, "--out", out, "--epochs", 1, "--force",
        "--set", "teacher.min_ap=0.0", *SMALL,
    )
    assert result.exit_code == 0, result.output
    teacher = json.loads((out / "run.json").read_text())["teacher"]
    assert teacher["refined"]["box_targets"].startswith("refined")
    assert teacher["refined"]["detector"] == str((refined["dab6-tiny"].parent / "dab6-tiny" / "checkpoints" / "best.safetensors").resolve())
    first = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r][0]
    for key in ("loss_box_gt_bridged", "loss_kd_shared_queries"):
        assert key in first and first[key] == first[key], key  # present and not NaN


def test_resume_of_a_refine_run_continues_it(detectors, data, tmp_path):
    run = tmp_path / "refined"
    refine(detectors["gfl-tiny"], data, run)
    result = invoke("refine", "--resume", run, "--epochs", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 4  # 8 images / batch 4, two epochs


def test_every_rank_checks_the_run_folder_before_rank_0_writes_into_it(detectors, data, tmp_path, monkeypatch):
    """Under torchrun, rank 0 writes the run's stub right after its own folder check; a rank still
    checking would then find a folder of other files and refuse it (CI saw exactly that). So the
    first barrier a refine run meets comes before anything exists in ``--out``."""
    import distill.distributed as dist

    out = tmp_path / "refined"
    folders_at_barrier = []
    monkeypatch.setattr(dist, "barrier", lambda: folders_at_barrier.append(sorted(p.name for p in out.iterdir()) if out.exists() else None))
    refine(detectors["gfl-tiny"], data, out)
    assert folders_at_barrier[0] is None and (out / "run.json").is_file()


def test_a_cache_of_the_refined_teacher_is_not_the_detectors(refined, detectors, data, tmp_path):
    """``detkd cache`` takes a refined run; its rows (refined boxes) are refused for the plain detector."""
    cache = tmp_path / "cache"
    result = invoke("cache", refined["dab6-tiny"], "--data", data, "--out", cache, "--recipe", "asag-kd-tiny", *SMALL[:2], "--no-progress")
    assert result.exit_code == 0, result.output
    line = one_error_line(invoke(
        "distill", "asag-kd-tiny", "--teacher", detectors["dab6-tiny"], "--cache", cache, "--data", data, "--out", tmp_path / "kd",
        "--epochs", 1, "--force", *SMALL,
    ))
    assert "teacher cache was built for another teacher (teacher.weights_sha256: cache " in line and "rebuild it with 'detkd cache'" in line


@pytest.mark.parametrize("recipe", ["gfl-tiny", "dab6-tiny"])
def test_export_of_a_refined_run_holds_the_refiner(recipe, refined, data, tmp_path):
    """``detkd export`` of a refined run: onnxruntime gives the refined detections (the refiner after
    the NMS for GFL, in the head for DAB-DETR), not the plain detector's."""
    pytest.importorskip("onnxruntime")
    from export_helpers import assert_same_detections
    from tolerances import fp32_chain

    from distill.data import DetectionTransform, load_dataset
    from distill.data.loader import collate
    from distill.export import load_session, run_session
    from distill.export.onnx_file import export_onnx
    from students.saved import load_detector

    run = refined[recipe]
    result = invoke("export", run, "--format", "onnx", "--dynamic-batch")
    assert result.exit_code == 0, result.output
    model, meta = load_detector(run)
    model.detector.score_thresh = 0.0  # a one-epoch detector scores below the default threshold
    path = tmp_path / "refined.onnx"
    path.write_bytes(export_onnx(model, meta, dynamic_batch=True))  # what the command runs, on the model with that threshold
    dataset = load_dataset(data, "val", DetectionTransform(64, hflip_prob=0.0))
    images = collate([dataset.get(i, flip=False) for i in range(2)], size_divisor=32).images
    sizes = torch.tensor([[64, 64]] * 2)
    with torch.no_grad():
        expected = model.postprocess(model.head(model.features(images), sizes), sizes)
        plain = model.detector.postprocess(model.detector.head(model.detector.features(images), sizes), sizes)
    # the refiner moved boxes (by more than 0.05 px; DAB-DETR's NMS then keeps other rows), so the
    # plain detections would fail the comparison below
    assert any(len(e.scores) != len(p.scores) or (e.boxes - p.boxes).abs().max().item() > 0.05 for e, p in zip(expected, plain))
    got = run_session(load_session(path), images)
    # decoder layers (DAB-DETR 6) or the dense head (1), then 3 refiner steps, each ~200 fp32 roundings
    assert_same_detections(expected, got, fp32_chain(200 * ((6 if recipe == "dab6-tiny" else 1) + 3)), 64)
