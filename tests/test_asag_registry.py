"""The detector contract for every registered sparse student (timm style: one test set per name)."""
import json

import pytest
import torch
from asag_helpers import box_outputs, image_sizes, images, targets, tiny_params

from distill.structures import Detections
from students import create_student, list_students
from students.registry import student_entrypoint

SPARSE = [n for n in list_students() if student_entrypoint(n).__module__.startswith("students.sparse.")]


def test_sparse_family_is_registered():
    assert {"asag_s", "asag_s_gen", "asag_a", "sparse_rcnn6", "dab_detr"} <= set(SPARSE)


@pytest.fixture(scope="module", params=SPARSE)
def student(request):
    torch.manual_seed(0)
    return create_student(request.param, **tiny_params(request.param))


def test_loss_finite_and_gradients_reach_every_parameter(student):
    student.train()
    sizes = image_sizes()
    with torch.no_grad():  # zero-init box outputs would block gradients to the layers behind them
        for layer in box_outputs(student):
            layer.weight.normal_(std=0.01)
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
    for d, (h, w) in zip(detections, sizes.tolist()):
        assert d.boxes.shape[1] == 4 and d.scores.shape == d.labels.shape == (d.boxes.shape[0],)
        assert d.boxes.shape[0] <= student.max_detections
        assert torch.equal(d.scores, d.scores.sort(descending=True).values)  # best first
        assert ((d.labels >= 0) & (d.labels < student.num_classes)).all() and ((d.scores >= 0) & (d.scores <= 1)).all()
        # boxes clipped to the image inside the padding, never inverted
        assert (d.boxes[:, 0] >= 0).all() and (d.boxes[:, 1] >= 0).all() and (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
        assert (d.boxes[:, 2] >= d.boxes[:, 0]).all() and (d.boxes[:, 3] >= d.boxes[:, 1]).all()


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


@pytest.mark.parametrize("recipe_name", ["sparse6-tiny", "asag-s-tiny", "dab6-tiny"])
def test_sparse_recipes_build_and_train_one_step(recipe_name):
    from recipes import load_recipe

    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    model = create_student(recipe.student.name, num_classes=3, **recipe.student.params)
    size = recipe.data.image_size
    sizes = torch.tensor([[size, size]] * 2)
    x = torch.randn(2, 3, size, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(6):  # the same batch six times: a working loss and backward fit it
        losses, _ = model.loss(model(x, sizes), targets()[1:], sizes)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        totals.append(float(sum(losses.values()).detach()))
    assert totals[-1] < totals[0], totals


def test_decode_queries_starts_from_the_given_boxes(student):
    """Shared distillation queries: query k of the result is decoded from box k (zero-initialised delta
    heads return the boxes they were given)."""
    student.eval()
    sizes = image_sizes()
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [10.0, 12.0, 50.0, 44.0]]).expand(3, 2, 4).contiguous()
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    fresh = create_student(student.config["name"], **student.config["params"]).eval()
    with torch.no_grad():
        out = fresh.decode_queries(fresh.features(images()), sizes, boxes, valid)
    assert out.logits.shape == (3, 2, 3) and torch.equal(out.valid, valid) and out.aux == []
    if fresh.spec.bins is None:
        # zero deltas: the boxes come back through xyxy <-> cxcywh (a few roundings of ≤ 50 px, ≤ 1e-5)
        torch.testing.assert_close(out.boxes, boxes, atol=1e-3, rtol=0)
