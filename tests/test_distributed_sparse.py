"""torchrun DDP on CPU (gloo), sparse: an ASAG-S student distilled from the 6-stage teacher under two
processes equals one process. Tolerances and their derivation: ``tests/ddp_helpers.py``."""
import pytest
from ddp_helpers import REFERENCE, assert_same_run, detkd

SPARSE = ["--set", "student.params.norm_eval=true", "--set", "train.threads=1", "--set", "train.warmup_steps=0", "--no-progress"]
SMALL = ["--set", "data.image_size=64", "--set", "train.batch_size=4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data and a one-epoch fp32 sparse teacher (the teacher need not be a reference run: both
    students read the same one)."""
    root = tmp_path_factory.mktemp("ddp_sparse")
    detkd("data", "scenes", root / "data", "--train", 16, "--val", 4, "--size", 64, "--seed", 3)
    detkd("train", "sparse6-tiny", "--data", root / "data", "--out", root / "sparse6", *SMALL, "--epochs", "1", *SPARSE)
    return root


def test_two_gloo_processes_distill_a_sparse_student_like_one(setup):
    """The sparse path under DDP: ASAG-S from the 6-stage teacher with GT-bridged, teacher-set and
    shared-query terms (Hungarian matching per image, num_boxes all-reduced, the extra decoder pass)."""
    args = ["distill", "asag-kd-tiny", "--teacher", setup / "sparse6", "--data", setup / "data", "--force", *SMALL, "--epochs", "2", *SPARSE]
    detkd(*args, "--out", setup / "s1", env=REFERENCE)
    detkd(*args, "--out", setup / "s2", procs=2, env=REFERENCE)
    assert_same_run(setup / "s1", setup / "s2")


def test_two_gloo_processes_train_dab_detr_and_distil_from_it_like_one(setup):
    """DAB-DETR under DDP: as the student (Group DETR, a Hungarian loss per decoder layer, num_boxes
    all-reduced), then as the teacher of ASAG-S (GT-bridged, teacher-set and shared-query terms)."""
    train = ["train", "dab6-tiny", "--data", setup / "data", *SMALL, "--epochs", "2", *SPARSE]
    detkd(*train, "--out", setup / "dab1", env=REFERENCE)
    detkd(*train, "--out", setup / "dab2", procs=2, env=REFERENCE)
    assert_same_run(setup / "dab1", setup / "dab2")
    distil = ["distill", "asag-kd-tiny", "--teacher", setup / "dab1", "--data", setup / "data", "--force", *SMALL, "--epochs", "2", *SPARSE]
    detkd(*distil, "--out", setup / "from-dab1", env=REFERENCE)
    detkd(*distil, "--out", setup / "from-dab2", procs=2, env=REFERENCE)
    assert_same_run(setup / "from-dab1", setup / "from-dab2")


def test_two_gloo_processes_train_a_refiner_like_one(setup):
    """``detkd refine`` under DDP: the refiner on the frozen 6-stage detector (Hungarian matches per
    image, the refined-row count averaged over ranks), fp64 reference runs."""
    args = ["refine", setup / "sparse6", "--data", setup / "data", "--epochs", "2", *SMALL, "--set", "train.threads=1", "--set", "train.lr=1e-3", "--no-progress"]
    detkd(*args, "--out", setup / "r1", env=REFERENCE)
    detkd(*args, "--out", setup / "r2", procs=2, env=REFERENCE)
    assert_same_run(setup / "r1", setup / "r2")
