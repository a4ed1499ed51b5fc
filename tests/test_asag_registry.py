"""The detector contract for every registered sparse student (timm style: one test set per name)."""
import json

import pytest
import torch

from distill.structures import Detections
from students import create_student, list_students
from students.registry import student_entrypoint
from asag_helpers import TINY, image_sizes, images, targets

SPARSE = [n for n in list_students() if student_entrypoint(n).__module__ == "students.asag.model"]


def test_sparse_family_is_registered():
    assert {"asag_s", "asag_s_gen", "asag_a", "sparse_rcnn6"} <= set(SPARSE)


@pytest.fixture(scope="module", params=SPARSE)
def student(request):
    torch.manual_seed(0)
    extra = {"sampling_points": 8, "mixing_out_points": 16} if request.param == "asag_a" else {}
    return create_student(request.param, **TINY, **extra)


def test_loss_finite_and_gradients_reach_every_parameter(student):
    student.train()
    sizes = image_sizes()
    with torch.no_grad():  # zero-init box outputs would block gradients to the layers behind them
        for stage in [*student.stages, *student.heads]:
            stage.reg_out.weight.normal_(std=0.01)
        student.proposal.reg_out.weight.normal_(std=0.01)
    predictions = student.head(student.features(images()), sizes)
    losses, matches = student.loss(predictions, targets(), sizes)
    assert losses and all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    student.zero_grad()
    sum(losses.values()).backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing
    assert matches.num_images == 3 and matches.weight is not None


def test_postprocess_shapes(student):
    student.eval()
    sizes = image_sizes()
    with torch.no_grad():
        detections = student.postprocess(student.head(student.features(images()), sizes), sizes)
    assert len(detections) == 3 and all(isinstance(d, Detections) for d in detections)
    for d in detections:
        assert d.boxes.shape[1] == 4 and d.scores.shape == d.labels.shape == (d.boxes.shape[0],)
        assert d.boxes.shape[0] <= student.max_detections and torch.isfinite(d.boxes).all()


def test_config_round_trip_rebuilds_the_same_model(student):
    config = json.loads(json.dumps(student.config))  # what a checkpoint stores
    assert config["name"] in SPARSE and config["params"]["strides"] == [8, 16, 32]
    rebuilt = create_student(config["name"], **config["params"])
    assert rebuilt.config == config
    rebuilt.load_state_dict(student.state_dict())
    student.eval(), rebuilt.eval()
    sizes = image_sizes()
    with torch.no_grad():
        a, b = student(images(), sizes), rebuilt(images(), sizes)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)
    assert rebuilt.spec == student.spec and rebuilt.spec.family == "sparse"


@pytest.mark.parametrize("recipe_name", ["sparse6-tiny", "asag-s-tiny"])
def test_sparse_recipes_build_and_train_one_step(recipe_name):
    from recipes import load_recipe

    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    model = create_student(recipe.student.name, num_classes=3, **recipe.student.params)
    size = recipe.data.image_size
    sizes = torch.tensor([[size, size]] * 2)
    x = torch.randn(2, 3, size, size)
    losses, _ = model.loss(model(x, sizes), targets()[1:], sizes)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
