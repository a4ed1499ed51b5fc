"""Shared distillation queries (KD-DETR): the teacher's boxes through the student's decoder, isolated."""
import copy

import pytest
import torch
from asag_helpers import TINY, image_sizes, images, targets

import distill
from distill.engine.distiller import Distiller, distillation_terms, shared_sides
from distill.errors import ConfigError
from distill.inputs import DistillInputs
from distill.pairers import create_pairer
from distill.structures import Batch, DetectorSpec, Predictions
from students import create_student
from teachers import FrozenTeacher


def literal_teacher() -> DistillInputs:
    """Image 0: queries 0, 1, 3 valid (2 is padding), confidences 0.5 / 0.9 / 0.7; image 1: query 2 only."""
    logits = torch.full((2, 4, 3), -5.0)
    logits[0, 0, 0], logits[0, 1, 2], logits[0, 3, 1] = 0.0, 2.1972246, 0.8472979
    logits[1, 2, 1] = 1.0
    boxes = torch.tensor([[[0, 0, 10, 10], [5, 5, 30, 30], [0, 0, 1, 1], [40, 40, 60, 60]]] * 2, dtype=torch.float32)
    valid = torch.tensor([[True, True, False, True], [False, False, True, False]])
    spec = DetectorSpec("sparse", 3, (8, 16, 32), 32, None, query_boxes=True)
    return DistillInputs(spec, Predictions(logits, boxes, valid), None, None, image_sizes(2))


def test_the_teachers_most_confident_boxes_become_queries_paired_one_to_one():
    pairer = create_pairer("shared_queries", top_k=2)
    boxes, valid, index = pairer.teacher_queries(literal_teacher())
    assert index.tolist() == [[1, 3], [2, -1]]  # by confidence, capped at top_k; image 1 padded
    assert valid.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(boxes[0], torch.tensor([[5.0, 5, 30, 30], [40, 40, 60, 60]]))
    pairs = pairer(None, literal_teacher(), [], "predictions")
    assert pairs.image.tolist() == [0, 0, 1] and pairs.student.tolist() == [0, 1, 0] and pairs.teacher.tolist() == [1, 3, 2]
    # logits ln 9 and ln(7/3) to 8 digits, then one sigmoid (≤ 4 roundings ≈ 2.4e-7): atol 1e-5 is > 10x
    torch.testing.assert_close(pairs.weight, torch.tensor([0.9, 0.7, torch.sigmoid(torch.tensor(1.0))]), atol=1e-5, rtol=0)


def test_only_students_that_decode_given_boxes_accept_shared_queries():
    dense = DetectorSpec("dense", 3, (8, 16, 32, 64, 128), 16, 17)
    with pytest.raises(ConfigError, match="cannot start from given boxes"):
        distill.create_loss("kd", pairer="shared_queries").check_pair(dense, dense)
    with pytest.raises(ConfigError, match="top_k"):
        create_pairer("shared_queries", top_k=0)
    sparse = create_student("asag_s", **TINY).spec
    assert sparse.query_boxes
    distill.create_loss("kd", pairer="shared_queries").check_pair(sparse, dense)  # a dense teacher's NMS top-K


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    student = create_student("asag_s", **TINY)
    torch.manual_seed(1)
    teacher = create_student("sparse_rcnn6", **{**TINY, "num_queries": 8})
    batch = Batch(images(), targets(), [0, 1, 2], image_sizes(), torch.ones(3), torch.zeros(3, dtype=torch.bool))
    return student, FrozenTeacher(teacher), batch


def test_the_extra_group_is_isolated_from_the_students_own_queries(pair):
    student, teacher, batch = pair
    student.eval()  # deterministic: no dropout
    with torch.no_grad():
        features = student.features(batch.images)
        before = student.head(features, batch.image_sizes)
        t_in = teacher.inputs(batch, None, frozenset({"head"}))
        side = shared_sides([distill.create_loss("kd", pairer="shared_queries")], student, features, t_in, batch.image_sizes)
        after = student.head(features, batch.image_sizes)
    shared = next(iter(side.values())).student.predictions
    # own queries untouched, bit for bit (the same kernels on the same shapes in this process)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    torch.testing.assert_close(after.boxes, before.boxes, rtol=0, atol=0)
    _, valid, index = create_pairer("shared_queries").teacher_queries(t_in)
    assert shared.logits.shape[:2] == valid.shape and torch.equal(shared.valid, valid)
    # the group is one query group: its queries attend to each other (as KD-DETR's distillation
    # points do), so query 0 alone decodes otherwise than query 0 among the other shared boxes
    boxes, valid, _ = create_pairer("shared_queries").teacher_queries(t_in)
    with torch.no_grad():
        one = student.decode_queries(features, batch.image_sizes, boxes[:, :1], valid[:, :1])
        again = student.decode_queries(features, batch.image_sizes, boxes, valid)
    torch.testing.assert_close(again.logits, shared.logits, rtol=0, atol=0)  # the pass itself is deterministic
    assert valid[:, 1:].any()  # the others exist, so self-attention mixes them in
    assert not torch.allclose(one.logits[:, 0], shared.logits[:, 0], atol=1e-4)


def test_distilling_through_shared_queries_trains_the_students_decoder_only(pair):
    student, teacher, batch = pair
    student.train()
    before = copy.deepcopy(teacher.model.state_dict())
    losses = [distill.create_loss("kd", pairer="shared_queries", heads="all"), distill.create_loss("box", pairer="shared_queries")]
    terms = Distiller(student, teacher, losses).step(student, batch)
    assert float(terms["loss_kd_shared_queries"].detach()) > 0
    # the box head starts at zero deltas: a shared query's box is its teacher box, so box KD starts at 0
    # (zero deltas from a zero-initialised layer are exactly 0; what is left is the xyxy <-> cxcywh round trip,
    # elementwise IEEE ops, the same bits on every CPU: ≤ one ulp of a ≤ 64 px coordinate per edge. Measured: 0.0)
    assert float(terms["loss_box_shared_queries"].detach()) == pytest.approx(0.0, abs=1e-5)
    student.zero_grad()
    (terms["loss_kd_shared_queries"] + terms["loss_box_shared_queries"]).backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("heads" in n or "stages" in n for n in grads) and any("proposal" in n for n in grads)
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.model.state_dict().items())
    with pytest.raises(ValueError, match="shared_sides"):
        distillation_terms(losses[:1], ["k"], DistillInputs(student.spec), DistillInputs(teacher.spec), batch.targets)


def test_the_extra_pass_runs_the_parallel_heads_only_when_a_term_reads_them(pair):
    student, teacher, batch = pair
    student.train()
    with torch.no_grad():
        features = student.features(batch.images)
        t_in = teacher.inputs(batch, None, frozenset({"head"}))
        final = shared_sides([distill.create_loss("kd", pairer="shared_queries")], student, features, t_in, batch.image_sizes)
        every = shared_sides([distill.create_loss("kd", pairer="shared_queries", heads="all")], student, features, t_in, batch.image_sizes)
    final, every = next(iter(final.values())).student.predictions, next(iter(every.values())).student.predictions
    # heads: all -> the proposal and the first parallel heads as aux (4 heads: 1 + 3); the final head alone otherwise
    assert student.parallel_heads == 4 and len(every.aux) == 4 and final.aux == []
    torch.testing.assert_close(final.logits, every.logits, rtol=0, atol=0)  # the same main head either way
    torch.testing.assert_close(final.boxes, every.boxes, rtol=0, atol=0)


# ----------------------------------------------------------------------------- KD-DETR's random points
def test_random_points_are_kd_detrs_draw_shared_by_the_batch_and_clipped_to_each_image():
    from distill.pairers.shared import random_boxes

    sizes = torch.tensor([[64, 128], [32, 32]])  # (height, width)
    torch.manual_seed(7)
    boxes = random_boxes(5, sizes, "cpu", torch.float64)
    torch.manual_seed(7)
    cx, cy, w, h = torch.randn(5, 4, dtype=torch.float64).sigmoid().unbind(-1)
    expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).clamp(0, 1)
    assert boxes.shape == (2, 5, 4)
    torch.testing.assert_close(boxes[0], expected * torch.tensor([128.0, 64, 128, 64], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(boxes[1], expected * 32, rtol=0, atol=1e-12)  # the same draw on every image
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()


def test_random_points_follow_the_teachers_boxes_and_pair_with_the_teachers_decoded_rows():
    pairer = create_pairer("shared_queries", top_k=2, random=3)
    assert pairer.teacher_decodes and pairer.teacher_needs == {"head", "decode"} and pairer.cache_refusal
    assert str(pairer) == "shared_queries(top_k=2, random=3)"
    boxes, valid, index = pairer.teacher_queries(literal_teacher())
    assert boxes.shape == (2, 5, 4) and index.tolist() == [[1, 3, -1, -1, -1], [2, -1, -1, -1, -1]]
    assert valid.tolist() == [[True, True, True, True, True], [True, False, True, True, True]]
    torch.testing.assert_close(boxes[0, :2], torch.tensor([[5.0, 5, 30, 30], [40, 40, 60, 60]]))
    # the teacher's decoder output on those 5 points: row k answers student row k, weighted by its own max p
    logits = torch.full((2, 5, 3), -5.0)
    logits[0, 2, 1], logits[1, 4, 0] = 0.0, 2.1972246  # p = 0.5, 0.9
    decoded = DistillInputs(literal_teacher().spec, Predictions(logits, boxes, valid), None, None, image_sizes(2))
    pairs = pairer(None, decoded, [], "predictions")
    assert pairs.image.tolist() == [0] * 5 + [1] * 4 and pairs.student.tolist() == pairs.teacher.tolist() == [0, 1, 2, 3, 4, 0, 2, 3, 4]
    p_min = torch.sigmoid(torch.tensor(-5.0))
    expected = torch.tensor([p_min, p_min, 0.5, p_min, p_min, p_min, p_min, p_min, 0.9])
    torch.testing.assert_close(pairs.weight, expected, atol=1e-5, rtol=0)  # ln 9 to 8 digits: as above


def test_random_points_need_a_teacher_that_decodes_given_boxes():
    dense = DetectorSpec("dense", 3, (8, 16, 32, 64, 128), 16, 17)
    sparse = create_student("asag_s", **TINY).spec
    with pytest.raises(ConfigError, match="random: 2 runs the teacher's decoder"):
        distill.create_loss("kd", pairer="shared_queries", pairer_params={"random": 2}).check_pair(sparse, dense)
    distill.create_loss("kd", pairer="shared_queries", pairer_params={"random": 2}).check_pair(sparse, sparse)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="random must be an integer"):
            create_pairer("shared_queries", random=bad)


def test_random_points_run_both_decoders_and_train_the_student_only(pair):
    student, teacher, batch = pair
    student.train()
    before = copy.deepcopy(teacher.model.state_dict())
    losses = [distill.create_loss("kd", pairer="shared_queries", pairer_params={"top_k": 4, "random": 6}),
              distill.create_loss("box", pairer="shared_queries", pairer_params={"top_k": 4, "random": 6})]
    distiller = Distiller(student, teacher, losses)
    assert "decode" in distiller.needs
    _, features, s_in = distiller.student_side(student, batch)
    t_in = distiller.teacher_side(batch, s_in)
    torch.manual_seed(3)
    sides = shared_sides(losses, student, features, t_in, batch.image_sizes)
    side = sides[losses[0].pairer]
    k = min(4, int(t_in.predictions.valid.sum(1).max())) + 6
    assert side.student.predictions.logits.shape[:2] == side.teacher.predictions.logits.shape[:2] == (3, k)
    # the teacher's decoder on its own boxes reproduces its own predictions (same decoder, zero content start
    # is how its queries start too, so only the points differ): its rows are not its head's rows
    assert side.teacher is not t_in and side.teacher.predictions.logits.requires_grad is False
    torch.manual_seed(3)
    terms = distiller.step(student, batch)
    assert float(terms["loss_kd_shared_queries"].detach()) > 0 and float(terms["loss_box_shared_queries"].detach()) > 0
    student.zero_grad()
    (terms["loss_kd_shared_queries"] + terms["loss_box_shared_queries"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.model.state_dict().items())


def test_no_cache_serves_random_points():
    from recipes import load_recipe
    from teachers.cache_select import CacheSpec, serves

    # asag-kd-tiny: GT-bridged, teacher-set and shared-query terms (term 3), all served by a query cache
    spec = CacheSpec(("none", "hflip"), (), (), 32, queries=True)
    assert serves(spec, load_recipe("asag-kd-tiny"))
    assert not serves(spec, load_recipe("asag-kd-tiny", ["losses.3.pairer_params.random=4"]))
