"""Sparse detectors at the model level: shapes, valid masks, aux heads / stages, groups, query sources."""
import pytest
import torch
from asag_helpers import SIZE, TINY, image_sizes, images, targets
from tolerances import FP64_SAME_MATH, fp32_chain
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.detector import Detector
from distill.structures import Predictions, Target
from students import create_student
from students.sparse import LearnedAnchors, Queries, QuerySource, SparseDetector


def _model(name="asag_s", seed=0, **kw):
    torch.manual_seed(seed)
    return create_student(name, **{**TINY, **kw})


def _flops(model, x, sizes) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, sizes)
    return counter.get_total_flops()


@pytest.mark.parametrize("name, num_aux", [("asag_s", 4), ("sparse_rcnn6", 6)])
def test_training_shapes_valid_and_matches_with_0_1_3_gts(name, num_aux):
    model = _model(name).train()
    assert isinstance(model, Detector) and model.family == "sparse" and model.spec.family == "sparse"
    x, sizes = images(), image_sizes()
    pred = model.head(model.features(x), sizes)
    assert pred.logits.shape == (3, 12, 3) and pred.boxes.shape == (3, 12, 4) and pred.valid.all()
    assert len(pred.aux) == num_aux  # proposals + 3 parallel heads | proposals + 5 earlier stages
    assert all(a.logits.shape == (3, 12, 3) and a.boxes.shape == (3, 12, 4) for a in pred.aux)
    losses, matches = model.loss(pred, targets(), sizes)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values()), losses
    assert [len(i) for i in matches.pred_index] == [0, 1, 3]
    assert len(set(matches.pred_index[2].tolist())) == 3 and sorted(matches.gt_index[2].tolist()) == [0, 1, 2]
    suffixes = {k.split("_", 2)[2] for k in losses if k.count("_") == 2}
    assert suffixes == set(model.aux_names(num_aux))
    assert model.match(pred, targets(), sizes).pred_index[2].tolist() == matches.pred_index[2].tolist()


def test_batch_of_empty_images_trains():
    model = _model().train()
    x, sizes = images(2), image_sizes(2)
    losses, matches = model.loss(model(x, sizes), [Target.empty(), Target.empty()], sizes)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(len(i) == 0 for i in matches.pred_index)


def test_inference_runs_one_head_without_aux_at_the_cost_of_one():
    model = _model().eval()
    calls = []
    for k, head in enumerate(model.heads):
        head.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
    x, sizes = images(), image_sizes()
    with torch.no_grad():
        pred = model(x, sizes)
    assert pred.aux == [] and calls == [3]  # the main head (last copy) only
    single = _model(parallel_heads=1)
    assert _flops(model, x, sizes) == _flops(single, x, sizes)
    model.train()
    calls.clear()
    model(x, sizes)
    assert calls == [0, 1, 2, 3]


def test_postprocess_shapes_and_clipping():
    model = _model().eval()
    sizes = image_sizes()
    with torch.no_grad():
        detections = model.postprocess(model(images(), sizes), sizes)
    assert len(detections) == 3
    for det, (h, w) in zip(detections, sizes.tolist()):
        assert det.boxes.shape == (36, 4) and det.scores.shape == (36,) and det.labels.shape == (36,)  # 12 x 3 <= 100
        assert (det.boxes[:, 2] <= w).all() and (det.boxes[:, 3] <= h).all() and (det.boxes >= 0).all()
        assert (det.scores[:-1] >= det.scores[1:]).all() and det.labels.max() < 3


def test_groups_are_isolated_in_training():
    model = _model(groups=3).train()
    x, sizes = images(), image_sizes()
    before = model(x, sizes)
    assert before.logits.shape == (3, 36, 3) and before.queries.groups.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    with torch.no_grad():  # move group 1's queries: boxes and content
        model.query_source.box_logits[12:24] += torch.randn(12, 4)
        model.query_source.content[12:24] += torch.randn(12, 32)
    after = model(x, sizes)
    for b, a in zip([before, *before.aux], [after, *after.aux]):
        # groups 0 and 2 unchanged, bit for bit: the same kernels on the same shapes in this process, and
        # group 1 reaches them only through attention weights that are exactly 0 (exp(-inf))
        for g in (slice(0, 12), slice(24, 36)):
            assert torch.equal(b.logits[:, g], a.logits[:, g])
            assert torch.equal(b.boxes[:, g], a.boxes[:, g])
        assert not torch.allclose(b.boxes[:, 12:24], a.boxes[:, 12:24], atol=1e-3)


def test_groups_one_to_one_matching_per_group_and_group0_matches():
    model = _model(groups=2).train()
    sizes = image_sizes()
    pred = model(images(), sizes)
    losses, matches = model.loss(pred, targets(), sizes)
    assert all(torch.isfinite(v) for v in losses.values())
    assert [len(i) for i in matches.pred_index] == [0, 1, 3] and all((i < 12).all() for i in matches.pred_index)
    full = model.criterion.matcher(pred, targets(), sizes, pred.queries.groups)
    assert [len(i) for i in full.pred_index] == [0, 2, 6]  # one query per GT in each group


def test_groups_inference_is_group0_at_the_same_cost():
    grouped, single = _model(groups=3), _model(groups=1)
    state = grouped.state_dict()
    state["query_source.box_logits"] = state["query_source.box_logits"][:12]
    state["query_source.content"] = state["query_source.content"][:12]
    single.load_state_dict(state)
    x, sizes = images(), image_sizes()
    grouped.eval(), single.eval()
    with torch.no_grad():
        a, b = grouped(x, sizes), single(x, sizes)
    assert a.logits.shape == (3, 12, 3)
    # inference runs group 0 alone: the same kernels on the same shapes as the single-group model, so the same bits
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)
    assert _flops(grouped, x, sizes) == _flops(single, x, sizes)


class PaddedSource(QuerySource):
    """A stand-in for the ASAG generator: a variable number of anchors per image, padded, with a loss."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, features, image_sizes, targets=None):
        self.calls.append(targets is not None)
        batch = features[0].shape[0]
        h, w = image_sizes[:, 0].float(), image_sizes[:, 1].float()
        grid = torch.linspace(0.15, 0.85, 3)
        cy, cx = torch.meshgrid(grid, grid, indexing="ij")
        centres = torch.stack([cx.flatten(), cy.flatten()], -1)  # (9, 2) normalised
        side = self.scale.detach()  # anchors are handed over detached, as the generator's are
        boxes = torch.cat([centres - side / 2, centres + side / 2], -1)[None] * torch.stack([w, h, w, h], -1)[:, None]
        valid = torch.zeros(batch, 9, dtype=torch.bool)
        valid[:, :5] = True
        valid[-1] = True  # the last image has all 9
        return Queries(boxes, valid, extras={"scores": self.scale.expand(batch, 9)})

    def loss(self, queries, targets, image_sizes):
        return {"loss_anchor": (queries.extras["scores"] * queries.valid).sum() / queries.valid.sum()}


def test_pluggable_query_source_with_padding():
    model = _model()
    source = PaddedSource()
    model.set_query_source(source)
    model.train()
    sizes = image_sizes()
    feats = model.features(images())
    pred = model.head(feats, sizes, targets())
    assert source.calls == [True] and pred.valid.sum(1).tolist() == [5, 5, 9]
    assert all((a.valid == pred.valid).all() for a in pred.aux)
    losses, matches = model.loss(pred, targets(), sizes)
    assert "loss_anchor" in losses and all(torch.isfinite(v) for v in losses.values())
    for b, index in enumerate(matches.pred_index):
        assert pred.valid[b, index].all()  # padding is never matched
    sum(losses.values()).backward()
    assert source.scale.grad is not None
    model.eval()
    with torch.no_grad():
        pred = model.head(model.features(images()), sizes)
    model.max_detections = 1000
    detections = model.postprocess(pred, sizes)
    assert [len(d.scores) for d in detections] == [15, 15, 27]  # valid queries x 3 classes only


def test_bins_head_carries_box_bins_and_starts_at_the_proposals():
    model = _model(box_head="bins").train()
    assert model.spec.bins == 17
    sizes = image_sizes()
    pred = model(images(), sizes)
    assert pred.bins.logits.shape == (3, 12, 4, 17)
    assert pred.bins.centers.shape == (3, 12, 2) and pred.bins.spacing.shape == (3, 12, 4)
    assert torch.equal(pred.bins.decode(), pred.boxes)  # the boxes are that decode (same op, same bits)
    proposals = pred.aux[0].boxes
    # identity init, bin 4 of 17: a behaviour of the init (small random bin logits), not a rounding bound
    assert torch.allclose(pred.boxes, proposals, atol=1e-2 * SIZE)
    losses, _ = model.loss(pred, targets(), sizes)
    assert {"loss_dfl", "loss_dfl_head0"} <= set(losses) and torch.isfinite(losses["loss_dfl"])
    assert _model().spec.bins is None


def test_boxes_are_detached_between_stages():
    model = _model("sparse_rcnn6").train()
    with torch.no_grad():  # box outputs start at zero weight, which would block every gradient behind them
        for stage in [*model.stages, *model.heads]:
            stage.reg_out.weight.normal_(std=0.01)
    sizes = image_sizes()
    pred = model(images(), sizes)
    losses, _ = model.loss(pred, targets(), sizes)
    losses["loss_l1"].backward()  # the last stage's box loss only
    assert model.stages[0].reg_out.weight.grad is None or model.stages[0].reg_out.weight.grad.abs().sum() == 0
    assert model.heads[0].reg_out.weight.grad.abs().sum() > 0
    assert model.stages[0].cls_out.weight.grad is None  # no path from the last box to an earlier head
    assert model.stages[0].interact.params.weight.grad.abs().sum() > 0  # query features are not detached


def test_invalid_arguments_are_config_errors():
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match="box_head"):
        _model(box_head="points")
    with pytest.raises(ConfigError, match="groups"):
        _model(groups=0)
    assert isinstance(_model(), SparseDetector) and isinstance(_model().query_source, LearnedAnchors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_folded_groups_equal_the_block_diagonal_mask(dtype):
    """Two code paths (groups folded into the batch vs one block-masked attention; other shapes, other
    kernels): the same math, proven in fp64 (``FP64_SAME_MATH``); in fp32 within an attention layer's
    rounding: projections and dot products of width 16, a softmax over ≤ 6, ≈ 32 roundings relative to
    the largest activation (``fp32_chain(32)``)."""
    from students.sparse.layers import MaskedSelfAttention

    torch.manual_seed(0)
    attn = MaskedSelfAttention(16, 4, iof_bias=True).eval().to(dtype)
    x, pos = torch.randn(2, 6, 16, dtype=dtype), torch.randn(2, 6, 16, dtype=dtype)
    xy = torch.rand(2, 6, 2, dtype=dtype) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(2, 6, 2, dtype=dtype) * 30], -1)
    valid = torch.tensor([[True, True, False, True, True, True], [True] * 6])
    contiguous = torch.tensor([0, 0, 0, 1, 1, 1])  # folded into the batch
    order = torch.tensor([0, 3, 1, 4, 2, 5])  # interleaved: groups [0, 1, 0, 1, 0, 1] -> block mask path
    with torch.no_grad():
        folded = attn(x, valid, contiguous, pos, boxes, residual_with_pos=True)
        masked = attn(x[:, order], valid[:, order], contiguous[order], pos[:, order], boxes[:, order], residual_with_pos=True)
    assert folded.dtype == dtype
    scale = float(masked.abs().max())
    tol = FP64_SAME_MATH if dtype == torch.float64 else fp32_chain(32)
    torch.testing.assert_close(folded[:, order], masked, rtol=0, atol=tol * scale)


def test_detach_detaches_the_queries_too():
    model = _model().train()
    pred = model(images(1), image_sizes(1)).detach()
    assert pred.queries is not None and not pred.queries.content.requires_grad and not pred.logits.requires_grad
    assert all(not a.boxes.requires_grad for a in pred.aux)


def test_query_sources_are_registered_by_name_and_recorded_in_config():
    from distill.errors import ConfigError
    from students.sparse.queries import register_query_source

    @register_query_source("padded_test_source")
    def _padded(num_queries, dim, groups, strides, scale: float = 0.3):
        source = PaddedSource()
        source.scale.data.fill_(scale)
        return source

    model = _model(query_source="padded_test_source", query_source_params={"scale": 0.4})
    # pytest.approx's default rel 1e-6 against one fp32 rounding of 0.4 (≤ 6e-8)
    assert isinstance(model.query_source, PaddedSource) and model.query_source.scale.item() == pytest.approx(0.4)
    assert model.config["params"]["query_source"] == "padded_test_source"
    rebuilt = create_student(model.config["name"], **model.config["params"])
    assert isinstance(rebuilt.query_source, PaddedSource) and rebuilt.query_source.scale.item() == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="'query_source' must be one of .*'learned'.*, got str 'nope'"):
        _model(query_source="nope")


def test_matches_carry_every_aux_heads_own_matching():
    model = _model(groups=2).train()
    sizes = image_sizes()
    pred = model(images(), sizes)
    _, matches = model.loss(pred, targets(), sizes)
    assert len(matches.aux) == len(pred.aux) == 4
    for aux_pred, aux in zip(pred.aux, matches.aux):
        assert [len(i) for i in aux.pred_index] == [0, 1, 3] and all((i < 12).all() for i in aux.pred_index)  # group 0
        alone = model.criterion.matcher(aux_pred, targets(), sizes, pred.queries.groups)
        for b in range(3):
            keep = alone.pred_index[b] < 12
            assert alone.pred_index[b][keep].tolist() == aux.pred_index[b].tolist()


def test_asag_generator_feeds_the_student():
    from students.sparse.asag.generator_source import GeneratorSource

    kw = {k: v for k, v in TINY.items() if k != "num_queries"}
    model = _model("asag_s_gen", **kw).train()
    assert isinstance(model.query_source, GeneratorSource) and model.config["params"]["query_source"] == "asag"
    x, sizes = torch.randn(3, 3, 128, 128), torch.tensor([[128, 128], [96, 112], [128, 128]])
    tg = targets()
    pred = model.head(model.features(x), sizes, tg)  # targets: the generator's training windows
    assert pred.valid.any(1).all() and pred.valid.shape == pred.logits.shape[:2]
    losses, matches = model.loss(pred, tg, sizes)
    assert {"loss_anchor_cls", "loss_anchor_l1", "loss_anchor_giou", "loss_cls", "loss_cls_prop"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    for b, index in enumerate(matches.pred_index):
        assert pred.valid[b, index].all()
    model.eval()
    with torch.no_grad():
        pred = model(x, sizes)
    assert pred.aux == [] and all(len(d.scores) <= model.max_detections for d in model.postprocess(pred, sizes))
    with pytest.raises(Exception, match="strides 8, 16 and 32"):
        _model("asag_s_gen", **{**kw, "strides": (16, 32)})


def test_a_query_source_declares_its_loss_and_other_modules_are_refused():
    model = _model().train()
    assert isinstance(model.query_source, LearnedAnchors) and isinstance(model.query_source, QuerySource)
    assert type(model.query_source).loss is QuerySource.loss  # learned anchors add no terms of their own
    sizes = image_sizes()
    pred = model.head(model.features(images()), sizes)
    losses, _ = model.loss(pred, targets(), sizes)
    own, _ = model.criterion(pred, targets(), sizes, pred.queries.groups, model.aux_names(len(pred.aux)))
    assert sorted(losses) == sorted(own)
    with pytest.raises(TypeError, match="query source Linear is a Linear, not a students.sparse.queries.QuerySource"):
        model.set_query_source(nn.Linear(2, 2))


def test_generated_anchors_are_the_generators_valid_queries_only():
    kw = {k: v for k, v in TINY.items() if k != "num_queries"}
    generated = _model("asag_s_gen", **kw).eval()  # seeds torch: the images below are the same every run
    x, sizes = torch.randn(2, 3, 128, 128), torch.tensor([[128, 128], [96, 112]])
    with torch.no_grad():
        pred = generated(x, sizes)
    anchors = pred.generated_anchors()
    assert [len(a) for a in anchors] == pred.queries.valid.sum(1).tolist() and 0 < len(anchors[1]) < pred.queries.valid.shape[1]
    for b, a in enumerate(anchors):
        assert torch.equal(a, pred.queries.boxes[b, : len(a)])  # the generator packs its valid anchors first
    with torch.no_grad():
        assert _model().eval()(x, sizes).generated_anchors() is None  # learned anchors are not generated
    assert Predictions(pred.logits, pred.boxes, pred.valid).generated_anchors() is None
