"""CrossKD: a student's intermediate head maps finished by the frozen teacher's head, distilled to
the teacher's own predictions (distill/losses/crosskd.py), on real GFL modules."""
import copy
import math

import pytest
import torch
from tolerances import fp32_chain

import distill
from distill.engine.distiller import Distiller
from distill.errors import ConfigError
from distill.losses import qfl_kd_rows
from distill.structures import Batch, Target
from students import create_student
from teachers import FrozenTeacher


def gfl(channels=16, convs=2, seed=0):
    torch.manual_seed(seed)
    return create_student("gfl", backbone="resnet10t", num_classes=3, fpn_channels=channels, head_convs=convs)


def batch(size=64) -> Batch:
    torch.manual_seed(0)
    return Batch(
        images=torch.randn(2, 3, size, size),
        targets=[Target(torch.tensor([[8.0, 10.0, 40.0, 44.0], [30.0, 5.0, 60.0, 30.0]]), torch.tensor([0, 2])), Target.empty()],
        image_ids=[0, 1], image_sizes=torch.tensor([[size, size]] * 2), scales=torch.ones(2), flipped=torch.zeros(2, dtype=torch.bool),
    )


def crosskd_terms(stage=None, **kw):
    return [distill.create_loss("crosskd", part="cls", pairer="all", stage=stage, **kw),
            distill.create_loss("crosskd", part="box", pairer="main", stage=stage, **kw),
            distill.create_loss("crosskd", part="giou", pairer="gt_boxes", stage=stage, **kw)]


def test_qfl_kd_rows_literal():
    # one class: student logit 0 (p = 0.5), teacher q = 0.8: BCE = -(0.8 ln 0.5 + 0.2 ln 0.5) = ln 2,
    # focal factor |0.5 - 0.8| = 0.3 (beta 1), 0.09 (beta 2)
    t = torch.tensor([[math.log(0.8 / 0.2)]])
    # fp32: ≤ 16 roundings; |0.5 - sigmoid(ln 4)| cancels 0.8 / 0.3 ≈ 3x (tests/tolerances.py)
    assert float(qfl_kd_rows(torch.zeros(1, 1), t, beta=1.0)) == pytest.approx(0.3 * math.log(2), rel=fp32_chain(16, condition=3))
    assert float(qfl_kd_rows(torch.zeros(1, 1), t, beta=2.0)) == pytest.approx(0.09 * math.log(2), rel=fp32_chain(16, condition=3))
    # two classes are summed; equal logits give exactly 0
    assert float(qfl_kd_rows(torch.tensor([[1.5, -2.0]]), torch.tensor([[1.5, -2.0]]))) == 0.0


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_head_from_any_stage_finishes_the_forward_exactly(stage):
    model = gfl().eval()
    with torch.no_grad():
        feats = model.features(batch().images)
        out = model.head(feats)
        cls, bins = model.head_from_stage(stage, out.stages.cls[stage], out.stages.reg[stage])
    assert out.stages.num_blocks == model.spec.head_stages == 2
    assert torch.equal(cls, out.logits) and torch.equal(bins, out.bins.logits)  # the same ops on the same maps


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_crossing_into_a_copy_of_the_student_gives_zero(stage):
    # teacher = the student: the crossed predictions are the student's own, so both parts vanish
    student = gfl().eval()
    teacher = FrozenTeacher(copy.deepcopy(student))
    terms = Distiller(student, teacher, crosskd_terms(stage)).step(student, batch())
    # the copy runs the same kernels on the same maps in this process: the same bits, so exactly 0
    assert terms["loss_crosskd_all"].item() == 0.0
    assert terms["loss_crosskd_main"].item() == 0.0


def test_gradients_reach_the_student_and_adapter_never_the_teacher():
    student, teacher_model = gfl(channels=16, convs=1), gfl(channels=32, convs=2, seed=1)
    teacher = FrozenTeacher(teacher_model)
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    losses = crosskd_terms(student_channels=16, teacher_channels=32)
    student.train()
    terms = Distiller(student, teacher, losses).step(student, batch())
    assert min(terms[k].item() for k in ("loss_crosskd_all", "loss_crosskd_main", "loss_crosskd_gt_boxes")) > 0
    (terms["loss_crosskd_all"] + terms["loss_crosskd_main"] + terms["loss_crosskd_gt_boxes"]).backward()
    head = dict(student.dense_head.named_parameters())
    assert head["cls_tower.0.weight"].grad.abs().sum() > 0 and head["reg_tower.0.weight"].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for loss in losses for p in loss.parameters())  # adapters
    # the student's own output convs are not on the crossed path: only its QFL/DFL terms train them
    assert head["cls_out.weight"].grad is None and head["reg_out.weight"].grad is None
    assert all(p.grad is None and not p.requires_grad for p in teacher_model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher_model.state_dict().items())
    assert not teacher_model.training


def test_student_stage_past_the_teacher_blocks_enters_at_its_output_convs():
    # student 2 blocks, teacher 1: stage 2 feeds the teacher's output convs directly (stage min(2, 1) = 1)
    student, teacher_model = gfl(convs=2), gfl(convs=1, seed=1)
    terms = Distiller(student, FrozenTeacher(teacher_model), crosskd_terms()).step(student, batch())
    assert torch.isfinite(terms["loss_crosskd_all"]) and terms["loss_crosskd_all"].item() > 0


@pytest.mark.parametrize("kwargs,message", [
    ({"part": "logits"}, "part must be one of"),
    ({"stage": -1}, "stage must be an integer"),
    ({"beta": 0}, "beta must be > 0"),
])
def test_bad_parameters_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        distill.create_loss("crosskd", **kwargs)


def test_pair_checks_name_what_is_wrong():
    student, teacher = gfl(channels=16, convs=1), gfl(channels=32, convs=1, seed=1)
    with pytest.raises(ConfigError, match="student_channels: 16 and teacher_channels: 32"):
        distill.create_loss("crosskd").check_pair(student.spec, teacher.spec)
    with pytest.raises(ConfigError, match="stage 3 > the student's 1 tower blocks"):
        distill.create_loss("crosskd", stage=3, student_channels=16, teacher_channels=32).check_pair(student.spec, teacher.spec)
