"""Every detector parameter is checked at recipe load, dense and sparse: type, range and relations, one
line naming ``student.params.<key>``, exit code 2 and no run folder (issue 18, class 4)."""
import pytest
import torch
from cli_helpers import invoke, one_error_line

from distill.errors import ConfigError
from recipes import load_recipe
from students import create_student, validate_student

CASES = [
    # (recipe, --set value, the message)
    ("asag-s-tiny", "student.params.strides=abc", "'student.params.strides' must be a list of integers, got str 'abc'"),
    ("asag-s-tiny", "student.params.strides=[16, 8, 32]", "'student.params.strides' must be a non-empty, strictly increasing list of powers of two"),
    ("asag-s-tiny", "student.params.strides=[]", "'student.params.strides' must be a non-empty"),
    ("asag-s-tiny", "student.params.strides=[8, 12, 32]", "'student.params.strides' must be a non-empty, strictly increasing list of powers of two"),
    ("asag-s-tiny", "student.params.num_bins=0", "'student.params.num_bins' must be an integer >= 2, got 0"),
    ("asag-s-tiny", "student.params.num_bins=1", "'student.params.num_bins' must be an integer >= 2, got 1"),
    ("asag-s-tiny", "student.params.num_bins=4", "'student.params.num_bins' must be large enough that (num_bins - 1) * bin_fraction > 0.5 (now 0.375)"),
    ("asag-s-tiny", "student.params.bin_fraction=0", "'student.params.bin_fraction' must be a finite number > 0, got 0"),
    ("asag-s-tiny", "student.params.roi_size=0", "'student.params.roi_size' must be an integer >= 1, got 0"),
    ("asag-s-tiny", "student.params.roi_canonical=0", "'student.params.roi_canonical' must be a finite number > 0, got 0"),
    ("asag-s-tiny", "student.params.num_heads=3", "'student.params.num_heads' must be a divisor of fpn_channels = 32, got 3"),
    ("asag-s-tiny", "student.params.fpn_channels=12", "'student.params.fpn_channels' must be a multiple of 8, >= 8, got 12"),
    ("asag-s-tiny", "student.params.groups=0", "'student.params.groups' must be an integer >= 1, got 0"),
    ("asag-s-tiny", "student.params.box_head=points", "'student.params.box_head' must be one of 'delta', 'bins', got str 'points'"),
    ("asag-s-tiny", "student.params.decoder=deformable", "'student.params.decoder' must be one of 'adamixer', 'dynamic', got str 'deformable'"),
    ("asag-s-tiny", "student.params.nms_iou=0", "'student.params.nms_iou' must be null or in (0, 1], got 0"),
    ("asag-s-tiny", "student.params.fpn_chanels=32", "unknown key 'student.params.fpn_chanels'"),
    ("asag-s-tiny", "student.name=asag_x", "'student.name' 'asag_x' is not a registered detector"),
    ("dab6-tiny", "student.params.num_heads=3", "'student.params.num_heads' must be a divisor of hidden_dim = 32, got 3"),
    ("dab6-tiny", "student.params.decoder_layers=0", "'student.params.decoder_layers' must be an integer >= 1, got 0"),
    ("dab6-tiny", "student.params.encoder_layers=-1", "'student.params.encoder_layers' must be an integer >= 0, got -1"),
    ("dab6-tiny", "student.params.anchor_size=1.5", "'student.params.anchor_size' must be in (0, 1), got 1.5"),
    ("dab6-tiny", "student.params.decoder_layers=two", "'student.params.decoder_layers' must be an integer, got str 'two'"),
    ("gfl-tiny", "student.params.reg_max=0", "'student.params.reg_max' must be an integer >= 1, got 0"),
    ("gfl-tiny", "student.params.prior_prob=1", "'student.params.prior_prob' must be in (0, 1), got 1"),
    ("gfl-tiny", "student.params.fpn_channels=true", "'student.params.fpn_channels' must be an integer, got True"),
    # the query source and its own parameters (the ASAG generator's)
    ("asag-s-tiny", "student.params.query_source=nope", "'student.params.query_source' must be one of 'asag', 'learned'"),
    ("asag-distill-sparse6", "student.params.query_source_params={fixed_grid: 7}", "'student.params.query_source_params' must be an even fixed_grid >= 2 (got 7)"),
    ("asag-distill-sparse6", "student.params.query_source_params={nope: 1}", "'student.params.query_source_params' must be keyword arguments of query source 'asag' ("),
    ("asag-distill-sparse6", "student.params.groups=2", "'student.params.groups' must be 1 with query_source 'asag' (image-specific anchors), got 2"),
    # the backbone: a timm model, with maps at the levels asked for, and weights that exist
    ("gfl-tiny", "student.params.backbone=resnet_nope", "'student.params.backbone' must be a timm model name (timm.list_models()), got str 'resnet_nope'"),
    ("gfl-tiny", "student.params.backbone=vit_tiny_patch16_224", "'student.params.backbone' must be a timm model with feature maps at strides [8, 16, 32] (it has [16, 16, 16])"),
    ("asag-s-tiny", "student.params.strides=[8, 16, 32, 64]", "'student.params.strides' must be strides of resnet10t's feature maps [2, 4, 8, 16, 32], got [8, 16, 32, 64]"),
    ("asag-s-tiny", "student.params.pretrained=offline", "'student.params.pretrained' must be None, 'timm' or a weights file: no offline weights are known for resnet10t"),
    ("dab6-tiny", "student.params.pretrained=/no/such/weights.pth", "'student.params.pretrained' must be None, 'timm', 'offline' or an existing weights file"),
]


@pytest.mark.parametrize("recipe,setting,message", CASES, ids=[c[1] for c in CASES])
def test_bad_detector_parameters_are_refused_at_recipe_load(recipe, setting, message):
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe, [setting])
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"--set {setting}: ") and message in line, line


def test_every_shipped_recipe_passes_the_checks():
    from recipes import list_recipes

    for name in list_recipes():
        load_recipe(name)  # raises on the first bad parameter


def test_the_api_gets_the_same_checks():
    with pytest.raises(ConfigError, match=r"student 'asag_s': 'num_bins' must be an integer >= 2, got 1"):
        create_student("asag_s", num_bins=1)
    with pytest.raises(ConfigError, match=r"x\.yaml: 'student\.params\.strides' must be a list of integers, got str 'abc'"):
        validate_student("dab_detr", {"strides": "abc"}, "x.yaml")
    validate_student("dab_detr", {"strides": [8, 16, 32], "hidden_dim": 64}, "x.yaml")  # fine: returns, builds nothing


@pytest.mark.parametrize("command", ["train", "distill"])
def test_cli_refuses_before_creating_the_run_folder(tmp_path, command):
    recipe = "dab6-tiny" if command == "train" else "asag-distill-dab"
    out = tmp_path / "run"
    args = [command, recipe, "--data", tmp_path / "no-data", "--out", out, "--set", "student.params.num_heads=3", "--no-progress"]
    if command == "distill":
        args[2:2] = ["--teacher", tmp_path / "no-teacher"]
    line = one_error_line(invoke(*args))
    divisor = "hidden_dim = 32" if command == "train" else "fpn_channels = 32"
    assert f"--set student.params.num_heads=3: 'student.params.num_heads' must be a divisor of {divisor}, got 3" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_checkpoint_configs_of_the_same_names_still_build():
    """The flat parameters a checkpoint stores rebuild the model (names and keys unchanged by the layout)."""
    torch.manual_seed(0)
    model = create_student("sparse_rcnn6", backbone="mobilenetv3_small_050", num_classes=3, strides=(8, 16, 32), fpn_channels=32,
                           num_queries=8, ffn_dim=64, dynamic_dim=8, num_heads=4)
    params = model.config["params"]
    assert params["stages"] == 6 and params["strides"] == [8, 16, 32] and "decoder" in params
    rebuilt = create_student("sparse_rcnn6", **params)
    assert set(rebuilt.state_dict()) == set(model.state_dict())
    assert {"stages.0.interact.params.weight", "heads.0.reg_out.weight", "proposal.self_attn.tau"} <= set(model.state_dict())


@pytest.mark.parametrize("name", ["sparse_rcnn6", "dab_detr"])
def test_a_model_built_from_typed_groups_records_its_flat_parameters(name):
    """The constructor takes typed option groups but records the flat parameters of its registered factory,
    so a model built without the registry still rebuilds from its config."""
    from students.sparse.dab_detr.model import build_dab_detr
    from students.sparse.roi_detector import build_sparse_detector

    small = {"backbone": "mobilenetv3_small_050", "num_classes": 3, "num_heads": 4, "ffn_dim": 32,
             **({"hidden_dim": 16, "decoder_layers": 1} if name == "dab_detr" else {"fpn_channels": 16, "dynamic_dim": 8, "stages": 6,
                                                                                     "parallel_heads": 1, "query_weighting": False, "box_pe": True})}
    registered = create_student(name, **small).config["params"]
    direct = (build_dab_detr if name == "dab_detr" else build_sparse_detector)(**small).config["params"]
    assert direct == registered
