"""The distillation engine: a frozen teacher, pluggable losses, any detector honouring the contract."""
import copy

import pytest
import torch
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

import distill
from distill.checkpoint import read_checkpoint
from distill.config import DataSpec, EvalSpec, LossSpec, ModelSpec, Recipe, TrainSpec
from distill.engine.distiller import Distiller, loss_keys
from distill.engine.evaluate import evaluate_detector
from distill.errors import CheckpointError, ConfigError
from distill.ops.atss import atss_assign
from distill.ops.boxes import square_anchors
from distill.structures import Batch, DenseOutputs, DetectorSpec, Matches, Target
from students import create_student
from students.gfl.coder import encode_targets
from students.gfl.head import dense_outputs
from students.gfl.losses import distribution_focal_loss
from students.gfl.postprocess import postprocess_dense
from teachers import FrozenTeacher, check_pair, class_index_for

STRIDES = (8, 16, 32, 64, 128)


class TinyDense(nn.Module):
    """A dense detector that is *not* our GFL: one conv stem, pooled pyramid, focal loss + DFL.

    It implements only the contract the engine relies on (``distill.detector``): features, head,
    loss, match, postprocess, spec.
    """

    family = "dense"

    def __init__(self, num_classes: int, channels: int, reg_max: int = 16):
        super().__init__()
        self.num_classes, self.fpn_channels, self.reg_max, self.strides = num_classes, channels, reg_max, STRIDES
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, stride=2, padding=1))
        self.cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.reg = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        self.config = {"name": "tiny_dense", "params": {}}

    @property
    def spec(self) -> DetectorSpec:
        return DetectorSpec("dense", self.num_classes, self.strides, self.fpn_channels, self.reg_max + 1)

    def features(self, images: Tensor) -> list[Tensor]:
        p3 = self.stem(images)
        return [p3] + [nn.functional.avg_pool2d(p3, 2**k, ceil_mode=True) for k in range(1, 5)]

    def head(self, features: list[Tensor], image_sizes: Tensor | None = None, targets=None) -> DenseOutputs:
        sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        points, strides = [], []
        for (h, w), s in zip(sizes, self.strides):
            yy, xx = torch.meshgrid((torch.arange(h) + 0.5) * s, (torch.arange(w) + 0.5) * s, indexing="ij")
            points.append(torch.stack([xx.flatten(), yy.flatten()], 1))
            strides.append(torch.full((h * w,), float(s)))
        return dense_outputs([self.cls(f) for f in features], [self.reg(f) for f in features], torch.cat(points), torch.cat(strides), sizes, image_sizes)

    def match(self, outputs: DenseOutputs, targets: list[Target], image_sizes: Tensor | None = None) -> Matches:
        anchors = square_anchors(outputs.points, outputs.strides)
        per_level = [h * w for h, w in outputs.level_sizes]
        results = [atss_assign(anchors, per_level, t.boxes, t.labels, self.num_classes, outputs.valid[b]) for b, t in enumerate(targets)]
        pred = [r.pos_mask.nonzero(as_tuple=True)[0] for r in results]
        quality = outputs.logits.detach().sigmoid().amax(-1)
        return Matches(pred, [r.matched_gt[i] for r, i in zip(results, pred)], [quality[b, i] for b, i in enumerate(pred)], {"pos_thresholds": [r.pos_thresholds for r in results]})

    def loss(self, outputs: DenseOutputs, targets: list[Target], image_sizes: Tensor):
        cls, reg = outputs.logits, outputs.bin_logits
        valid = outputs.valid
        matches = self.match(outputs, targets, image_sizes)
        labels = matches.scatter([t.labels[g] for t, g in zip(targets, matches.gt_index)], cls.shape[1], fill=self.num_classes)
        onehot = nn.functional.one_hot(labels, self.num_classes + 1)[..., : self.num_classes].float()
        num_pos = max(sum(len(i) for i in matches.pred_index), 1)
        loss_cls = sigmoid_focal_loss(cls[valid], onehot[valid], reduction="sum") / num_pos
        b = torch.cat([torch.full_like(i, k) for k, i in enumerate(matches.pred_index)])
        n = torch.cat(matches.pred_index)
        boxes = torch.cat([t.boxes[g] for t, g in zip(targets, matches.gt_index)])
        target = encode_targets(outputs.points[n], outputs.strides[n], boxes, self.reg_max)
        loss_dfl = distribution_focal_loss(reg[b, n].reshape(-1, self.reg_max + 1), target.reshape(-1)).sum() / (4 * num_pos) + reg.sum() * 0
        return {"loss_cls": loss_cls, "loss_dfl": loss_dfl}, matches

    def postprocess(self, outputs, image_sizes):
        return postprocess_dense(outputs, image_sizes)


def scene_batch(batch_size=2, size=64) -> Batch:
    torch.manual_seed(0)
    targets = [Target(torch.tensor([[8.0, 10.0, 40.0, 44.0], [30.0, 5.0, 60.0, 30.0]]), torch.tensor([0, 2])), Target.empty()]
    return Batch(
        images=torch.randn(batch_size, 3, size, size),
        targets=targets[:batch_size],
        image_ids=list(range(batch_size)),
        image_sizes=torch.tensor([[size, size]] * batch_size),
        scales=torch.ones(batch_size),
        flipped=torch.zeros(batch_size, dtype=torch.bool),
    )


def paper_losses(with_feature=False, student_channels=16, teacher_channels=16):
    losses = [
        distill.create_loss("ld", weight=0.25, pairer="main"),
        distill.create_loss("ld", weight=0.25, pairer="vlr"),
        distill.create_loss("kd", weight=1.0, pairer="main"),
    ]
    if with_feature:
        losses.append(distill.create_loss("feature", weight=1.0, pairer="gt_boxes", student_channels=student_channels, teacher_channels=teacher_channels))
    return losses


def gfl(channels=16, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    return create_student("gfl", backbone="resnet10t", num_classes=3, fpn_channels=channels, head_convs=1, **kw)


def test_distillation_terms_vanish_when_student_equals_teacher():
    student = gfl()
    teacher = FrozenTeacher(copy.deepcopy(student).eval())
    student.eval()  # same BN behaviour on both sides
    terms = Distiller(student, teacher, paper_losses(with_feature=True)).step(student, scene_batch())
    for key in ("loss_ld_main", "loss_ld_vlr", "loss_kd_main", "loss_feature_gt_boxes"):
        # the teacher is a copy of the student run by the same kernels on the same batch in this process: the
        # same bits, so every term is exactly 0
        assert terms[key].item() == 0.0, key
    assert terms["loss_qfl"].item() > 0  # the student's own losses stay


def test_teacher_stays_frozen_through_training_steps():
    student, teacher_model = gfl(channels=16), gfl(channels=32, seed=1)
    teacher = FrozenTeacher(teacher_model)
    teacher_model.train()  # pinned: must stay in eval mode
    assert not teacher_model.training and all(not m.training for m in teacher_model.modules())
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}  # includes BN running stats
    losses = paper_losses(with_feature=True, student_channels=16, teacher_channels=32)
    distiller = Distiller(student, teacher, losses)
    params = list(student.parameters()) + [p for l in losses for p in l.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    assert not {id(p) for p in teacher_model.parameters()} & {id(p) for g in optimizer.param_groups for p in g["params"]}
    student.train()
    for _ in range(2):
        terms = distiller.step(student, scene_batch())
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    for key, value in teacher_model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not p.requires_grad and p.grad is None for p in teacher_model.parameters())
    assert not isinstance(distiller, nn.Module)  # nothing can register the teacher as a submodule
    assert "adapter" in "".join(n for l in losses for n, _ in l.named_parameters())  # 16 -> 32 channels


def test_teacher_runs_only_the_parts_the_losses_need(monkeypatch):
    student, teacher_model = gfl(), gfl(seed=1)
    calls = []
    original = teacher_model.head
    monkeypatch.setattr(teacher_model, "head", lambda f, sizes=None, targets=None: calls.append(1) or original(f, sizes))
    feature_only = [distill.create_loss("feature", pairer="all")]
    Distiller(student, FrozenTeacher(teacher_model), feature_only).step(student, scene_batch())
    assert calls == []
    Distiller(student, FrozenTeacher(teacher_model), paper_losses()).step(student, scene_batch())
    assert calls == [1]


def test_class_mapping_reorders_teacher_logits():
    _, teacher_model = gfl(), gfl(seed=1)
    index = class_index_for(["b", "c", "a"], ["a", "b", "c"])
    assert index == [1, 2, 0]
    teacher = FrozenTeacher(teacher_model, class_index=torch.tensor(index))
    batch = scene_batch()
    mapped = teacher.inputs(batch, None, frozenset({"head"})).predictions
    raw = teacher_model(batch.images, batch.image_sizes)
    assert torch.equal(mapped.logits[..., 0], raw.logits[..., 1])
    assert torch.equal(mapped.logits[..., 2], raw.logits[..., 0])
    assert teacher.spec.num_classes == 3
    assert class_index_for(["a", "b"], ["a", "b"]) is None
    assert class_index_for(["cat"], ["dog", "kitty"], {"cat": "kitty"}) == [1]
    with pytest.raises(CheckpointError, match=r"teacher has no class \['cat'\]"):
        class_index_for(["cat"], ["dog"])


def test_pair_checks_refuse_mismatches_with_reasons():
    student = gfl()
    with pytest.raises(ConfigError, match="strides"):
        check_pair(student.spec, FrozenTeacher(TinyDenseStrides()).spec, paper_losses())
    with pytest.raises(ConfigError, match="reg_max 8 != student reg_max 16"):
        check_pair(student.spec, FrozenTeacher(gfl(reg_max=8)).spec, paper_losses())
    resampling = [distill.create_loss("ld", pairer="main", resample_bins="distance")]
    check_pair(student.spec, FrozenTeacher(gfl(reg_max=8)).spec, resampling)  # explicit resampling accepted
    with pytest.raises(ConfigError, match="adapter"):
        check_pair(student.spec, FrozenTeacher(gfl(channels=32)).spec, [distill.create_loss("feature", pairer="all")])
    with pytest.raises(ConfigError, match="strides"):  # the Distiller runs the same checks for API users
        Distiller(student, TinyDenseStrides(), paper_losses())


class TinyDenseStrides(TinyDense):
    def __init__(self):
        super().__init__(3, 16)
        self.strides = (8, 16, 32, 64)


def tiny_recipe(**train):
    return Recipe(
        name="custom-pair", kind="distill", purpose="test", student=ModelSpec("tiny_dense"),
        data=DataSpec(image_size=64), train=TrainSpec(**{"epochs": 1, "batch_size": 4, "lr": 0.01, "warmup_steps": 0, **train}),
        eval=EvalSpec(batch_size=8),
        losses=[LossSpec("ld", 0.25, "main"), LossSpec("kd", 1.0, "main")],
    )


def test_custom_pair_distills_through_the_engine(tmp_path):
    from distill.data import DetectionTransform, generate_scenes, load_dataset

    generate_scenes(tmp_path / "data", num_train=8, num_val=4, size=64, seed=1)
    train = load_dataset(tmp_path / "data", "train", DetectionTransform(64))
    val = load_dataset(tmp_path / "data", "val", DetectionTransform(64, hflip_prob=0.0))
    torch.manual_seed(0)
    student, teacher_model = TinyDense(10, 8), TinyDense(10, 24)
    teacher_before = copy.deepcopy(teacher_model.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    losses = [distill.create_loss("ld", weight=0.25, pairer="main"), distill.create_loss("kd", pairer="main"),
              distill.create_loss("feature", pairer="gt_boxes", student_channels=8, teacher_channels=24)]
    distiller = Distiller(student, teacher_model, losses, tiny_recipe())
    result = distiller.fit(train, val, tmp_path / "run", show_progress=False)
    assert result.steps == 2
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    for key in ("loss_cls", "loss_dfl", "loss_ld_main", "loss_kd_main", "loss_feature_gt_boxes"):
        assert key in records
    state, meta = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert set(state) == set(student.state_dict())  # student only: no teacher, no adapter
    assert meta["student"] == {"name": "tiny_dense", "params": {}}
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher_model.state_dict().items())
    both = distiller.evaluate(val)
    # each side's own metrics (the same model through the same kernels in this process: equal to the bit)
    assert both == {"student": evaluate_detector(student, val), "teacher": evaluate_detector(teacher_model, val)}


def test_loss_keys_are_unique_and_readable():
    losses = [distill.create_loss("ld", pairer="main"), distill.create_loss("ld", pairer="vlr"), distill.create_loss("ld", pairer="main", temperature=1.0)]
    assert loss_keys(losses) == ["loss_ld_main", "loss_ld_vlr", "loss_ld_main_2"]
