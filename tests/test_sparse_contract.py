"""Dense and sparse detectors share one engine: matched pairers, losses on pairs, refusals, and a query
detector (tests/toy_query.py) trained and distilled from a GFL teacher and from itself."""
import math

import pytest
import torch
import yaml
from cli_helpers import invoke, one_error_line
from tolerances import FP32_FEW_OPS_CANCEL, fp32_chain
from toy_query import ToyQuery

import distill
from distill.checkpoint import read_checkpoint, save_checkpoint
from distill.data import DetectionTransform, generate_scenes, load_dataset
from distill.engine.distiller import Distiller, distillation_terms, loss_keys
from distill.errors import ConfigError
from distill.inputs import DistillInputs
from distill.losses import reencode_bins
from distill.pairers import create_pairer, list_pairers, representative_matches
from distill.structures import BoxBins, DetectorSpec, Matches, Pairs, Predictions, Target
from students import create_student
from teachers import FrozenTeacher

SPARSE = DetectorSpec("sparse", 3, (8, 16, 32, 64, 128), 16, None)
DENSE = DetectorSpec("dense", 3, (8, 16, 32, 64, 128), 16, 17)
SIZES = torch.tensor([[64, 64]])


def side(logits, boxes, matches=None, spec=SPARSE) -> DistillInputs:
    logits, boxes = torch.as_tensor(logits, dtype=torch.float32)[None], torch.as_tensor(boxes, dtype=torch.float32)[None]
    valid = torch.ones(logits.shape[:2], dtype=torch.bool)
    return DistillInputs(spec, Predictions(logits, boxes, valid), None, matches, SIZES)


def literal_pair():
    """Two GTs; the student's Hungarian put GT 0 on query 3 and GT 1 on query 1; the teacher's put
    GT 1 on its query 0 and GT 0 on its query 2 (queries in a known, different order)."""
    gts = [Target(torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 50.0]]), torch.tensor([0, 2]))]
    s_logits = torch.arange(12.0).reshape(4, 3) / 10 - 0.5
    s_boxes = [[1, 1, 10, 10], [30, 28, 58, 50], [5, 5, 9, 9], [0, 2, 22, 20]]
    t_logits = torch.tensor([[-3.0, -2.0, 4.0], [0.0, 0.0, 0.0], [3.0, -1.0, -4.0]])
    t_boxes = [[31, 30, 60, 52], [10, 10, 12, 12], [1, 0, 19, 21]]
    student = side(s_logits, s_boxes, Matches([torch.tensor([1, 3])], [torch.tensor([1, 0])]))
    teacher = side(t_logits, t_boxes, Matches([torch.tensor([0, 2])], [torch.tensor([1, 0])]))
    return student, teacher, gts


def test_gt_bridged_pairs_each_gts_student_and_teacher_match_row_by_row():
    student, teacher, gts = literal_pair()
    pairs = create_pairer("gt_bridged")(student, teacher, gts, "predictions")
    assert pairs.image.tolist() == [0, 0]
    assert pairs.student.tolist() == [1, 3] and pairs.teacher.tolist() == [0, 2]  # GT 1: s1<->t0, GT 0: s3<->t2
    assert pairs.weight.tolist() == [1.0, 1.0]
    # KD reaches exactly those rows: the value is the mean binary KL of (s1, t0) and (s3, t2), T = 1
    kd = distill.create_loss("kd", pairer="gt_bridged", temperature=1.0)
    s, t = student.predictions.logits[0], teacher.predictions.logits[0]

    def bkl(a, b):  # KL(Bern(sigmoid(b)) || Bern(sigmoid(a))), mean over classes
        p, q = torch.sigmoid(b), torch.sigmoid(a)
        return float((p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean())

    expected = (bkl(s[1], t[0]) + bkl(s[3], t[2])) / 2
    # fp32 KL both sides: ≤ 16 roundings of log-ratios ≤ 3.6 against a mean KL of 0.47 (condition 8)
    assert float(kd(student, teacher, pairs)) == pytest.approx(expected, rel=FP32_FEW_OPS_CANCEL)
    # box: 5 * L1 / (w, h) + 2 * (1 - GIoU) on the same rows
    box = distill.create_loss("box", pairer="gt_bridged")
    sb, tb = student.predictions.boxes[0], teacher.predictions.boxes[0]
    from torchvision.ops import generalized_box_iou

    rows = [(1, 0), (3, 2)]
    per = [5 * float((sb[i] - tb[j]).abs().sum() / 64) + 2 * (1 - float(generalized_box_iou(sb[i : i + 1], tb[j : j + 1]))) for i, j in rows]
    # two GIoU codes (~20 roundings; 1 - GIoU = 0.25-0.31 cancels 3x), L1 on dyadic numbers (exact)
    assert float(box(student, teacher, pairs)) == pytest.approx(sum(per) / 2, rel=fp32_chain(20, condition=3))


def test_gt_bridged_picks_a_dense_teachers_best_iou_positive_per_gt():
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 50.0]])
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 19, 20], [30, 30, 50, 50], [1, 1, 21, 21], [30, 30, 60, 50]], dtype=torch.float32)
    # ATSS-style: GT 0 has positives 0, 1, 3; GT 1 has 2 and 4
    rep = representative_matches(boxes, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 0, 1, 0, 1]), gt)
    assert rep.tolist() == [1, 4]  # IoU 0.95 beats 0.25 and 0.75; 1.0 beats 0.67
    assert representative_matches(boxes, torch.tensor([0]), torch.tensor([0]), gt).tolist() == [0, -1]  # GT 1 unmatched
    assert representative_matches(boxes, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), gt).tolist() == [-1, -1]


def test_teacher_set_matches_on_a_literal_cost_matrix():
    # Student query 0 sits on teacher prediction 1, query 2 on teacher 0; query 1 is far from both.
    s_boxes = [[40, 40, 60, 60], [0, 50, 4, 54], [0, 0, 20, 20]]
    t_boxes = [[1, 0, 20, 21], [40, 41, 60, 60]]
    s_logits = torch.zeros(3, 3)
    t_logits = torch.tensor([[4.0, -4.0, -4.0], [-4.0, -4.0, 2.0]])
    student, teacher = side(s_logits, s_boxes), side(t_logits, t_boxes)
    pairer = create_pairer("teacher_set")
    pairs = pairer(student, teacher, [Target.empty()], "predictions")
    assert pairs.student.tolist() == [0, 2] and pairs.teacher.tolist() == [1, 0]
    # the teacher's confidence; the same sigmoid, maybe by another (vector / scalar) path: ≤ 8 roundings ≪ atol 1e-5
    torch.testing.assert_close(pairs.weight, torch.sigmoid(torch.tensor([2.0, 4.0])))
    # the cost the assignment used, entry by entry for (s0, t1): BCE(0.5, p_t) mean + 5 L1/64 - 2 GIoU
    from distill.pairers import set_matching_cost

    cost = set_matching_cost(s_logits, torch.tensor(s_boxes, dtype=torch.float32), torch.sigmoid(t_logits), torch.tensor(t_boxes, dtype=torch.float32), SIZES[0])
    assert cost.shape == (3, 2)
    # ≈ 20 fp32 roundings; ln2 + 0.08 - 1.9 cancels 2.4x: ≈ 3e-6, 1e-4 is > 30x
    assert float(cost[0, 1]) == pytest.approx(math.log(2) + 5 * 1 / 64 - 2 * (19 * 20) / (20 * 20), rel=1e-4)
    with pytest.raises(ConfigError, match="top_k"):
        create_pairer("teacher_set", top_k=0)
    with pytest.raises(ConfigError, match="no option 'k'"):
        create_pairer("teacher_set", k=3)


def test_pairers_that_cannot_serve_a_pair_refuse_at_build_time():
    assert sorted(list_pairers()) == ["all", "crossed_queries", "gt_boxes", "gt_bridged", "main", "shared_queries", "teacher_set", "vlr"]
    with pytest.raises(ConfigError, match="'vlr'.*student is a sparse detector"):
        distill.create_loss("ld", pairer="vlr").check_pair(SPARSE, DENSE)
    with pytest.raises(ConfigError, match="same dense location.*teacher is a sparse"):
        distill.create_loss("kd", pairer="main").check_pair(DENSE, SPARSE)
    with pytest.raises(ConfigError, match="student.*no distribution box head"):
        distill.create_loss("ld", pairer="gt_bridged").check_pair(SPARSE, DENSE)
    with pytest.raises(ConfigError, match="reads the student's dense positives"):
        distill.create_loss("feature", pairer="main").check_pair(SPARSE, DENSE)
    with pytest.raises(ConfigError, match="pairs predictions"):
        distill.create_loss("feature", pairer="gt_bridged").check_pair(DENSE, DENSE)
    with pytest.raises(ConfigError, match="3 classes, teacher 5"):
        distill.create_loss("kd", pairer="teacher_set").check_pair(SPARSE, DetectorSpec("dense", 5, DENSE.strides, 16, 17))
    distill.create_loss("feature", pairer="gt_boxes").check_pair(SPARSE, DENSE)  # FPN grids agree
    p3_p5 = DetectorSpec("sparse", 3, (8, 16, 32), 16, None)  # ASAG-S's levels against GFL's P3-P7
    distill.create_loss("feature", pairer="all").check_pair(p3_p5, DENSE)
    with pytest.raises(ConfigError, match=r"no FPN map at student stride\(s\) \[4\]"):
        distill.create_loss("feature", pairer="all").check_pair(DetectorSpec("sparse", 3, (4, 8), 16, None), DENSE)
    distill.create_loss("kd", pairer="gt_bridged").check_pair(SPARSE, DENSE)
    distill.create_loss("ld", pairer="teacher_set").check_pair(DENSE, DetectorSpec("sparse", 3, DENSE.strides, 16, 9))


def test_reencode_moves_teacher_edges_into_the_students_frame():
    # Teacher: centre (10, 10), 2 px per bin, 5 bins; student: centre (12, 10), 4 px per bin, 5 bins.
    probs = torch.zeros(1, 4, 5)
    probs[0, 0, 2] = 1.0  # left edge at 10 - 4 = 6 px -> 6 px left of the student's centre = bin 1.5
    probs[0, 1, 4] = 1.0  # top edge at 10 - 8 = 2 -> 8 px above (10) = bin 2
    probs[0, 2, 0] = 1.0  # right edge at 10 -> 2 px left of the student's centre: clamped to bin 0
    probs[0, 3, 1] = 0.5  # bottom at 12 (0.5) and 18 (0.5) -> 0.5 and 2.0 bins below 10
    probs[0, 3, 4] = 0.5
    out = reencode_bins(probs, torch.tensor([[10.0, 10.0]]), torch.full((1, 4), 2.0), torch.tensor([[12.0, 10.0]]), torch.full((1, 4), 4.0), 5)
    # dyadic literals: exact or a few roundings of values ≤ 1, ≪ assert_close's fp32 default (atol 1e-5)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(out[0, 1], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(out[0, 2], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(out[0, 3], torch.tensor([0.25, 0.25, 0.5, 0.0, 0.0]))
    # same frame: the identity
    same = reencode_bins(probs, torch.tensor([[3.0, 4.0]]), torch.full((1, 4), 8.0), torch.tensor([[3.0, 4.0]]), torch.full((1, 4), 8.0), 5)
    torch.testing.assert_close(same, probs)


def test_ld_between_frames_is_zero_when_the_boxes_agree_and_reaches_the_right_rows():
    # A student distribution head measuring from (20, 20) in 2 px bins; a teacher from (16, 24) in 4 px bins.
    k = 9
    t_centres, t_spacing = torch.tensor([[[16.0, 24.0]] * 2]), torch.full((1, 2, 4), 4.0)
    t_bins = torch.full((1, 2, 4, k), -30.0)
    t_bins[0, 1, :, 2] = 30.0  # teacher query 1: every edge 8 px from (16, 24) -> box (8, 16, 24, 32)
    teacher = DistillInputs(DENSE, Predictions(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), BoxBins(t_bins, t_centres, t_spacing)))
    s_bins = torch.full((1, 2, 4, k), -30.0)
    s_bins[0, 0, :, :] = torch.tensor([-30.0] * k)
    s_bins[0, 0, 0, 6] = s_bins[0, 0, 1, 2] = s_bins[0, 0, 2, 2] = s_bins[0, 0, 3, 6] = 30.0  # the same box from (20, 20)
    bins = BoxBins(s_bins.clone().requires_grad_(True), torch.tensor([[[20.0, 20.0]] * 2]), torch.full((1, 2, 4), 2.0))
    student = DistillInputs(SPARSE, Predictions(torch.zeros(1, 2, 3), bins.decode(), torch.ones(1, 2, dtype=torch.bool), bins), image_sizes=SIZES)
    torch.testing.assert_close(bins.decode()[0, 0], torch.tensor([8.0, 16.0, 24.0, 32.0]))
    ld = distill.create_loss("ld", pairer="gt_bridged", temperature=1.0)
    pairs = Pairs(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), torch.ones(1), 1)
    value = ld(student, teacher, pairs)
    # one-hot to e^-60 on both sides: exactly 0 up to terms ~e^-60 · 60 ≈ 1e-24
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6)
    other = Pairs(torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), torch.ones(1), 1)  # student query 1 disagrees
    ld(student, teacher, other).backward()
    assert bins.logits.grad[0, 1].abs().sum() > 0 and bins.logits.grad[0, 0].abs().sum() == 0


# ------------------------------------------------------------------------------------ end to end
SIZE = 64


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    generate_scenes(root / "data", num_train=8, num_val=4, size=SIZE, seed=1)
    train = load_dataset(root / "data", "train", DetectionTransform(SIZE))
    torch.manual_seed(0)
    gfl = create_student("gfl", backbone="resnet10t", num_classes=len(train.classes), fpn_channels=16, head_convs=1)
    save_checkpoint(root / "gfl.safetensors", gfl, {"student": gfl.config, "classes": list(train.classes), "image_size": SIZE})
    torch.manual_seed(1)
    toy = create_student("toy_query", num_classes=len(train.classes))
    save_checkpoint(root / "toy.safetensors", toy, {"student": toy.config, "classes": list(train.classes), "image_size": SIZE})
    return root, train, load_dataset(root / "data", "val", DetectionTransform(SIZE, hflip_prob=0.0))


SPARSE_LOSSES = [
    {"name": "kd", "weight": 1.0, "pairer": "gt_bridged"},
    {"name": "box", "weight": 1.0, "pairer": "gt_bridged"},
    {"name": "kd", "weight": 0.5, "pairer": "teacher_set", "pairer_params": {"top_k": 20}},
    {"name": "feature", "weight": 1.0, "pairer": "gt_boxes"},
]


def write_recipe(path, losses=SPARSE_LOSSES):
    recipe = {
        "name": "toy-distill", "kind": "distill", "purpose": "test", "student": {"name": "toy_query", "params": {}},
        "data": {"image_size": SIZE}, "train": {"epochs": 1, "batch_size": 4, "lr": 0.005, "warmup_steps": 0, "seed": 0},
        "eval": {"batch_size": 4}, "teacher": {"min_ap": 0.0}, "losses": losses,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("teacher_name", ["gfl", "toy"])
def test_query_detector_distills_from_gfl_and_from_itself_through_detkd_distill(scenes, tmp_path, teacher_name):
    root, _, _ = scenes
    recipe = write_recipe(tmp_path / "toy-distill.yaml")
    out = tmp_path / "run"
    result = invoke("distill", str(recipe), "--teacher", str(root / f"{teacher_name}.safetensors"), "--data", str(root / "data"), "--out", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    records = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss_kd_gt_bridged"' in line]
    assert len(records) == 2  # 8 images, batch 4
    for key in ("loss_cls", "loss_l1", "loss_giou", "loss_kd_gt_bridged", "loss_box_gt_bridged", "loss_kd_teacher_set", "loss_feature_gt_boxes"):
        assert key in records[0], key
    state, meta = read_checkpoint(out / "checkpoints" / "last.safetensors")
    assert meta["student"]["name"] == "toy_query" and not any(k.startswith("adapter") for k in state)


def test_self_distillation_terms_vanish_and_only_the_student_learns(scenes):
    _, train, _ = scenes
    from distill.data import collate

    batch = collate([train.get(i, False) for i in range(4)])
    torch.manual_seed(1)
    student = create_student("toy_query", num_classes=10).eval()
    teacher_model = ToyQuery(10)
    teacher_model.load_state_dict(student.state_dict())
    losses = [distill.create_loss(s["name"], weight=s["weight"], pairer=s["pairer"], pairer_params=s.get("pairer_params"),
                                  **({"student_channels": 16, "teacher_channels": 16} if s["name"] == "feature" else {})) for s in SPARSE_LOSSES]
    distiller = Distiller(student, teacher_model, losses)
    terms = distiller.step(student, batch)
    for key in loss_keys(losses):
        # the teacher is the student's weights run by the same kernels on the same batch in this process: the
        # same bits, so every term is exactly 0 (KL of identical log-rows, L1 / 1 - GIoU of identical boxes)
        assert float(terms[key].detach()) == 0.0, key
    assert float(terms["loss_cls"].detach()) > 0
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher_model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher_model.state_dict().items())


def test_sparse_pair_refusals_reach_the_cli_as_one_line(scenes, tmp_path):
    root, _, _ = scenes
    recipe = write_recipe(tmp_path / "bad.yaml", [{"name": "ld", "weight": 1.0, "pairer": "vlr"}])
    result = invoke("distill", str(recipe), "--teacher", str(root / "gfl.safetensors"), "--data", str(root / "data"), "--out", str(tmp_path / "run"), "--no-progress")
    assert result.exit_code == 2
    assert "'vlr'" in one_error_line(result) and "sparse" in one_error_line(result)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_heads_all_distils_every_auxiliary_head_with_its_own_matches():
    student, teacher, gts = literal_pair()
    # an auxiliary head (an earlier stage) whose own matching put GT 0 on query 0 and GT 1 on query 2
    aux_logits = torch.full((1, 4, 3), -1.0)
    aux_logits[0, 0] = torch.tensor([2.0, -2.0, 0.5])
    aux = Predictions(aux_logits, student.predictions.boxes.clone(), student.predictions.valid)
    student.predictions.aux = [aux]
    student.matches.aux = [Matches([torch.tensor([0, 2])], [torch.tensor([0, 1])])]
    final = distill.create_loss("kd", pairer="gt_bridged", temperature=1.0)
    every = distill.create_loss("kd", pairer="gt_bridged", temperature=1.0, heads="all")
    terms = distillation_terms([final, every], ["final", "all"], student, teacher, gts)
    aux_side = DistillInputs(SPARSE, aux, None, student.matches.aux[0], SIZES)
    aux_pairs = create_pairer("gt_bridged")(aux_side, teacher, gts, "predictions")
    assert aux_pairs.student.tolist() == [0, 2] and aux_pairs.teacher.tolist() == [2, 0]  # GT 0 -> t2, GT 1 -> t0
    aux_value = final(aux_side, teacher, aux_pairs)
    # the same two values by the same ops, averaged: exactly equal
    torch.testing.assert_close(terms["all"], (terms["final"] + aux_value) / 2, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no parameter .heads."):  # FPN features are shared by every head
        distill.create_loss("feature", pairer="gt_boxes", heads="all")
    with pytest.raises(ConfigError, match="heads must be one of final, all"):
        distill.create_loss("kd", heads="every")


def test_training_steps_hand_the_targets_to_the_head_and_evaluation_does_not(scenes, monkeypatch):
    """A head that learns its queries from the GT (ASAG's generator) sees the targets in training only."""
    from distill.data import collate
    from distill.engine.evaluate import evaluate_detector
    from distill.engine.trainer import detector_step

    _, train, val = scenes
    model = create_student("toy_query", num_classes=10)
    seen = []
    original = model.head
    monkeypatch.setattr(model, "head", lambda f, sizes=None, targets=None: seen.append(targets) or original(f, sizes, targets))
    batch = collate([train.get(i, False) for i in range(2)])
    detector_step(model, batch)
    teacher = FrozenTeacher(ToyQuery(10))
    Distiller(model, teacher, [distill.create_loss("kd", pairer="gt_bridged")]).step(model, batch)
    assert [t is batch.targets for t in seen] == [True, True]
    evaluate_detector(model, val, 4)
    assert all(t is None for t in seen[2:]) and len(seen) > 2
