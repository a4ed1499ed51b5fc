"""torchrun DDP on CPU (gloo) with teachers detkd never trained: a GFL student distilled from a
torchvision FCOS saved with ``torch.save(state_dict)``, and an ASAG-S student from a transformers DETR
saved with ``save_pretrained``: two processes train like one (fp64 reference runs). Tolerances and
their derivation: ``tests/ddp_helpers.py``."""
import json

import pytest
import torch
import yaml
from ddp_helpers import REFERENCE, assert_same_run, detkd

from distill.data.scenes import CLASSES

SPARSE = ["--set", "student.params.norm_eval=true", "--set", "train.threads=1", "--set", "train.warmup_steps=0", "--no-progress"]
GFL = {"name": "gfl", "params": {"backbone": "resnet10t", "fpn_channels": 16, "head_convs": 1, "norm_eval": True}}
ASAG = {"name": "asag_s", "params": {
    "backbone": "resnet10t", "strides": [8, 16, 32], "fpn_channels": 32, "num_queries": 20, "num_heads": 4, "ffn_dim": 64,
    "dynamic_dim": 16, "roi_canonical": 64.0, "box_head": "bins", "norm_eval": True}}


def recipe(path, student, losses):
    path.write_text(yaml.safe_dump({
        "name": path.stem, "kind": "distill", "purpose": "external teacher under torchrun", "student": student, "teacher": {"min_ap": 0.0},
        "data": {"image_size": 64}, "train": {"epochs": 2, "batch_size": 4, "optimizer": "adamw", "lr": 0.01, "seed": 0},
        "losses": losses,
    }))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_external")
    detkd("data", "scenes", root / "data", "--train", 16, "--val", 4, "--size", 64, "--seed", 3)
    return root


def test_two_gloo_processes_distil_from_a_torchvision_fcos_like_one(root):
    from teachers.external.torchvision import build_torchvision

    torch.manual_seed(0)
    model = build_torchvision("fcos_resnet18_fpn", len(CLASSES) + 1, norm_layer=torch.nn.BatchNorm2d)
    torch.save(model.state_dict(), root / "fcos.pth")
    (root / "names.json").write_text(json.dumps(["__background__", *CLASSES]))
    teacher = f"tv:fcos_resnet18_fpn={root / 'fcos.pth'},classes={root / 'names.json'}"
    terms = [{"name": "kd", "weight": 1.0, "pairer": "main", "params": {"temperature": 2, "mode": "bce"}},
             {"name": "box", "weight": 1.0, "pairer": "gt_bridged"}, {"name": "feature", "weight": 1.0, "pairer": "gt_boxes"}]
    args = ["distill", recipe(root / "gfl-fcos.yaml", GFL, terms), "--teacher", teacher, "--data", root / "data", "--force", *SPARSE]
    detkd(*args, "--out", root / "fcos1", env=REFERENCE)
    detkd(*args, "--out", root / "fcos2", procs=2, env=REFERENCE)
    assert_same_run(root / "fcos1", root / "fcos2")


def test_two_gloo_processes_distil_from_a_transformers_detr_like_one(root):
    transformers = pytest.importorskip("transformers")
    labels = {"num_labels": len(CLASSES), "id2label": dict(enumerate(CLASSES)), "label2id": {n: i for i, n in enumerate(CLASSES)}}
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], out_features=["stage4"])
    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
                                     encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                                     encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, auxiliary_loss=True, **labels)
    torch.manual_seed(0)
    transformers.AutoModelForObjectDetection.from_config(config).save_pretrained(root / "detr")
    terms = [{"name": "kd", "weight": 1.0, "pairer": "gt_bridged"}, {"name": "box", "weight": 1.0, "pairer": "gt_bridged"},
             {"name": "kd", "weight": 0.5, "pairer": "teacher_set", "pairer_params": {"top_k": 10}}]
    args = ["distill", recipe(root / "asag-detr.yaml", ASAG, terms), "--teacher", f"hf:{root / 'detr'}", "--data", root / "data", "--force", *SPARSE]
    detkd(*args, "--out", root / "detr1", env=REFERENCE)
    detkd(*args, "--out", root / "detr2", procs=2, env=REFERENCE)
    assert_same_run(root / "detr1", root / "detr2")
