"""CrossKD for query detectors: the student's query state entering its last decoder layer finished by
the frozen teacher's last layer, distilled to the teacher's decoder run from the same boxes
(distill/losses/crosskd_query.py, distill/pairers/crossed.py), on real sparse detectors."""
import math

import pytest
import torch
from asag_helpers import box_outputs, image_sizes, images, targets, tiny_params
from tolerances import fp32_chain

import distill
from distill.engine.distiller import Distiller
from distill.errors import ConfigError
from distill.inputs import DistillInputs
from distill.structures import Batch, DetectorSpec, Matches, Predictions
from students import create_student
from students.sparse.detector import QueryCrossing, SparsePredictions
from teachers import FrozenTeacher

WIDTHS = {"student_channels": 32, "teacher_channels": 48}


def batch() -> Batch:
    """Three 64 px images: no GT, one GT, three GTs (image 1 padded)."""
    return Batch(images=images(), targets=targets(), image_ids=[0, 1, 2], image_sizes=image_sizes(), scales=torch.ones(3),
                 flipped=torch.zeros(3, dtype=torch.bool))


def detector(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = create_student(name, **{**tiny_params(name), **overrides})
    with torch.no_grad():  # zero-initialised box layers would leave every box where it started
        for layer in box_outputs(model):
            layer.weight.normal_(std=0.05)
    return model


def crosskd_query_terms(**kw):
    return [distill.create_loss("crosskd_query", part="cls", pairer_params={"weighting": "uniform"}, **kw),
            distill.create_loss("crosskd_query", part="box", **kw)]


STUDENTS = {
    "asag_s": {},                                     # one RoI stage: the proposal block's content enters it
    "asag_s_gen": {},                                 # generator anchors: a variable number of queries, padded
    "sparse_rcnn6": {"stages": 3, "groups": 2},       # stages before the last one, Group DETR
    "dab_detr": {"decoder_layers": 3, "groups": 2},   # DAB-DETR's content after two layers
}


@pytest.mark.parametrize("name", STUDENTS)
def test_finishing_a_detector_from_its_own_crossing_state_gives_its_last_layer(name):
    model = detector(name, **STUDENTS[name]).train()
    b = batch()
    with torch.no_grad():
        features = model.features(b.images)
        out = model.head(features, b.image_sizes)
        crossing = out.crossing
        finished = model.finish_from_crossing(model.crossing_context(features, b.image_sizes), b.image_sizes, crossing.content,
                                              crossing.boxes, crossing.valid)
    q = crossing.content.shape[1]
    assert model.spec.query_crossing
    assert crossing.valid.shape == (3, q) and torch.equal(crossing.valid, out.valid[:, :q])
    # The same layer on the same state, but not always the same kernels: the forward masks the other group's
    # keys while the finish attends over group 0 alone (a softmax and sums of other lengths, so another
    # reduction order on some CPUs), and DAB-DETR's boxes round-trip through normalised anchors
    # (pixels -> inverse sigmoid -> sigmoid -> pixels, ~10 fp32 roundings on values up to 128 px, ~1e-5 px).
    # Measured here: RoI models bit-identical, DAB-DETR 4.8e-7 on logits (|x| <= 6) and 5.7e-6 px on boxes;
    # the bounds leave two orders of magnitude for other kernels.
    assert torch.allclose(finished.logits, out.logits[:, :q], rtol=1e-4, atol=1e-5)
    assert torch.allclose(finished.boxes, out.boxes[:, :q], rtol=1e-4, atol=1e-3)
    if "groups" in STUDENTS[name]:
        assert out.logits.shape[1] == 2 * q


def test_a_one_layer_dab_detr_has_nothing_to_cross():
    # its last layer reads the constant zero content, so a crossing would carry only boxes
    assert not detector("dab_detr", decoder_layers=1).spec.query_crossing
    assert detector("dab_detr", decoder_layers=2).spec.query_crossing


def test_eval_forwards_keep_no_crossing_state():
    model = detector("asag_s").eval()
    with torch.no_grad():
        assert model(images(), image_sizes()).crossing is None


def literal_sides(crossed_logits, crossed_shift, target_logits, target_boxes):
    """One 100 x 100 image, two queries at box [0, 0, 50, 50]: the teacher's tail returns the given
    logits and the boxes shifted by ``crossed_shift`` times the content (content = 1); its decoder returns
    the target rows. The student has one matched query."""
    boxes = torch.tensor([[[0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 50.0, 50.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    content = torch.ones(1, 2, 4, requires_grad=True)
    predictions = SparsePredictions(torch.zeros(1, 2, 1), boxes, valid, crossing=QueryCrossing(content, boxes, valid))
    sizes = torch.tensor([[100, 100]])
    spec = DetectorSpec("sparse", 1, (8,), 4, None, query_boxes=True, query_crossing=True)
    student = DistillInputs(spec, predictions, None, Matches([torch.tensor([0])], [torch.tensor([0])]), sizes)

    def tail(c, b, v):
        return Predictions(crossed_logits + 0 * c[..., :1], b + torch.tensor(crossed_shift) * c, v)

    teacher = DistillInputs(spec, None, None, None, sizes, decode=lambda b, v: Predictions(target_logits, target_boxes, v), decoder_tail=tail)
    return student, teacher, content


def test_class_part_is_quality_focal_kd_on_every_query_over_the_student_positives():
    # query 0: crossed logit 0 (p 0.5) vs teacher p 0.8: ln 2 x 0.3; query 1: equal logits, 0; one positive
    student, teacher, _ = literal_sides(torch.zeros(1, 2, 1), [0.0] * 4, torch.tensor([[[math.log(4.0)], [0.0]]]),
                                        torch.zeros(1, 2, 4))
    loss = distill.create_loss("crosskd_query", part="cls", pairer_params={"weighting": "uniform"})
    pairs = loss.pairer(student, teacher, [], "predictions")
    assert pairs.student.tolist() == pairs.teacher.tolist() == [0, 1] and pairs.weight.tolist() == [1.0, 1.0]
    assert float(loss(student, teacher, pairs).detach()) == pytest.approx(0.3 * math.log(2), rel=fp32_chain(16, condition=3))


def test_box_part_is_l1_and_giou_weighted_by_the_teachers_confidence():
    # crossed boxes: [10, 0, 60, 50] (shifted by 10 in x); targets: query 0 [0, 0, 50, 50] (p 0.8),
    # query 1 [10, 0, 60, 50] (p 0.5, the crossed box itself: 0). Query 0: L1 (10 + 10) / 100 = 0.2 -> x5 = 1;
    # IoU 2000 / 3000 = enclosing / union = 2/3 -> 1 - GIoU = 1/3 -> x2. Weighted mean: 0.8 (1 + 2/3) / (0.8 + 0.5).
    targets_ = torch.tensor([[[0.0, 0.0, 50.0, 50.0], [10.0, 0.0, 60.0, 50.0]]])
    student, teacher, content = literal_sides(torch.zeros(1, 2, 1), [10.0, 0.0, 10.0, 0.0], torch.tensor([[[math.log(4.0)], [0.0]]]), targets_)
    loss = distill.create_loss("crosskd_query", part="box")
    pairs = loss.pairer(student, teacher, [], "predictions")
    assert pairs.weight.tolist() == pytest.approx([0.8, 0.5])  # sigmoid(ln 4), sigmoid(0): a few fp32 roundings, inside approx's 1e-6
    value = loss(student, teacher, pairs)
    # fp32: the L1 sum, GIoU (areas, enclosure, ratios), the weighted mean: ≤ 30 roundings of O(1) values
    assert float(value.detach()) == pytest.approx(0.8 * (1 + 2 / 3) / 1.3, rel=fp32_chain(30))
    value.backward()
    assert content.grad.abs().sum() > 0  # through the teacher's tail to the student's content


def test_gradients_reach_the_student_before_its_last_layer_and_the_adapter_never_the_teacher():
    student = detector("asag_s").train()
    teacher_model = detector("dab_detr", seed=1, hidden_dim=48, decoder_layers=3)
    teacher = FrozenTeacher(teacher_model)
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    losses = crosskd_query_terms(**WIDTHS)
    terms = Distiller(student, teacher, losses).step(student, batch())
    keys = ["loss_crosskd_query_crossed_queries", "loss_crosskd_query_crossed_queries_2"]
    assert min(terms[k].item() for k in keys) > 0
    sum(terms[k] for k in keys).backward()
    assert all(p.grad is None for p in teacher_model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher_model.state_dict().items())
    for loss in losses:
        assert loss.adapter.weight.grad.abs().sum() > 0
    assert student.proposal.reg_out.weight.grad is None  # its boxes enter the last layer detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.proposal.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    # the last layer is the one the teacher's replaces: this term gives it nothing
    assert all(p.grad is None for p in student.heads.parameters())


def test_the_terms_run_in_a_distillation_step_with_a_sparse_rcnn_teacher():
    student = detector("dab_detr", decoder_layers=2, groups=2).train()
    teacher = FrozenTeacher(detector("sparse_rcnn6", seed=1, stages=2, fpn_channels=48))
    terms = Distiller(student, teacher, crosskd_query_terms(**WIDTHS)).step(student, batch())
    assert terms["loss_crosskd_query_crossed_queries"].item() > 0 and terms["loss_crosskd_query_crossed_queries_2"].item() > 0
    assert terms["loss_crosskd_query_crossed_queries"].requires_grad


@pytest.mark.parametrize("kwargs, message", [
    ({"part": "giou"}, "part must be one of cls, box"),
    ({"beta": 0}, "beta must be > 0"),
    ({"l1_weight": -1}, "l1_weight must be >= 0"),
    ({"student_channels": 0}, "student_channels must be a positive integer"),
    ({"pairer": "gt_bridged"}, "pairer must be crossed_queries"),
    ({"pairer_params": {"weighting": "top"}}, "weighting must be one of confidence, uniform"),
])
def test_bad_parameters_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        distill.create_loss("crosskd_query", **kwargs)


def test_only_crosskd_query_reads_the_crossed_pairs():
    with pytest.raises(ConfigError, match="loss 'kd': pairer 'crossed_queries' pairs rows only loss 'crosskd_query' reads"):
        distill.create_loss("kd", pairer="crossed_queries")


def test_pair_checks_name_what_is_wrong():
    sparse = detector("asag_s").spec
    loss = distill.create_loss("crosskd_query", part="cls")
    with pytest.raises(ConfigError, match="exposes none"):
        loss.check_pair(detector("dab_detr", decoder_layers=1).spec, sparse)
    gfl = create_student("gfl", backbone="resnet10t", num_classes=3, fpn_channels=32, head_convs=1).spec
    with pytest.raises(ConfigError, match="cannot start from given boxes"):
        loss.check_pair(sparse, gfl)
    wider = detector("dab_detr", hidden_dim=48).spec
    with pytest.raises(ConfigError, match="student query width 32, teacher 48; set student_channels: 32 and teacher_channels: 48"):
        loss.check_pair(sparse, wider)
    distill.create_loss("crosskd_query", part="cls", **WIDTHS).check_pair(sparse, wider)
    with pytest.raises(ConfigError, match="student has 3 classes, teacher 5"):
        distill.create_loss("crosskd_query", part="cls", **WIDTHS).check_pair(sparse, detector("dab_detr", hidden_dim=48, num_classes=5).spec)


def test_a_refined_teacher_is_not_crossed():
    # finishing its decoder from the student's state would skip the refiner its boxes are meant to come from
    from teachers.refine.model import RefinedDetector
    from teachers.refine.refiner import BoxRefiner

    dab = detector("dab_detr", hidden_dim=48)
    refined = RefinedDetector(dab, BoxRefiner([48, 48, 48], dab.spec.strides, channels=16))
    assert dab.spec.query_crossing and not refined.spec.query_crossing
    with pytest.raises(ConfigError, match="cannot finish a decoder from a given query state"):
        distill.create_loss("crosskd_query", part="box", **WIDTHS).check_pair(detector("asag_s").spec, refined.spec)
