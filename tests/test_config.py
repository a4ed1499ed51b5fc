"""Recipes: typed loading, strict validation by key, --set overrides, the shipped recipes."""
import pytest

from distill.config import Recipe, apply_overrides, recipe_from_dict
from distill.errors import ConfigError
from recipes import list_recipes, load_recipe


def minimal(**extra):
    raw = {"name": "r", "kind": "student", "purpose": "p", "student": {"name": "gfl", "params": {"backbone": "resnet18"}}}
    raw.update(extra)
    return raw


def test_minimal_recipe_gets_defaults():
    recipe = recipe_from_dict(minimal(), "r.yaml")
    assert isinstance(recipe, Recipe)
    assert recipe.train.optimizer == "adamw" and recipe.data.image_size == 160 and recipe.losses == []


def test_int_is_accepted_for_float_but_not_the_reverse():
    recipe = recipe_from_dict(minimal(train={"lr": 1}), "r.yaml")
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    with pytest.raises(ConfigError, match=r"r.yaml: 'train.epochs' must be int, got float 1.5"):
        recipe_from_dict(minimal(train={"epochs": 1.5}), "r.yaml")


@pytest.mark.parametrize(
    "raw, message",
    [
        (minimal(train={"lrr": 0.1}), "unknown key 'train.lrr'"),
        (minimal(colour="red"), "unknown key 'colour'"),
        (minimal(train={"optimizer": "adam"}), "'train.optimizer' must be one of 'sgd' | 'adamw', got 'adam'"),
        (minimal(train={"epochs": True}), "'train.epochs' must be int, got bool"),
        (minimal(losses=[{"name": "ld", "weight": "big"}]), "'losses[0].weight' must be float"),
        (minimal(losses={"name": "ld"}), "'losses' must be a list"),
        ({"name": "r", "kind": "student", "purpose": "p"}, "missing required key 'student'"),
    ],
)
def test_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("|", r"\|").replace("[", r"\[").replace("]", r"\]")):
        recipe_from_dict(raw, "r.yaml")


def test_overrides_parse_yaml_values_and_reach_nested_keys_and_list_items():
    raw = minimal(losses=[{"name": "ld", "weight": 0.25}])
    apply_overrides(raw, ["train.lr=0.01", "student.params.fpn_channels=64", "losses.0.weight=2", "train.milestones=[8, 11]", "train.grad_clip=null"])
    recipe = recipe_from_dict(raw, "r.yaml")
    assert recipe.train.lr == 0.01
    assert recipe.student.params["fpn_channels"] == 64
    assert recipe.losses[0].weight == 2.0
    assert recipe.train.milestones == [8, 11]
    assert recipe.train.grad_clip is None


@pytest.mark.parametrize("pair, message", [("train.lr", "expected key=value"), ("losses.3.weight=1", "not an index"), ("train.lr.x=1", "not a mapping")])
def test_bad_overrides(pair, message):
    raw = minimal(losses=[{"name": "ld"}], train={"lr": 0.1})
    with pytest.raises(ConfigError, match=message):
        apply_overrides(raw, [pair])


@pytest.mark.parametrize("name", list_recipes())
def test_shipped_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.purpose and "\n" not in recipe.purpose


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*gfl-tiny"):
        load_recipe("nope")


def test_recipe_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line"):
        load_recipe(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_recipe(scalar)


@pytest.mark.parametrize("name", [n for n in list_recipes() if load_recipe(n).kind == "distill"])
def test_every_distill_recipe_fits_its_teacher_recipe(name):
    """Build the student and the teacher recipe's detector (no weights) and run every loss's pair check."""
    import inspect

    from distill.engine.run import build_losses
    from students import create_student, student_entrypoint
    from teachers import FrozenTeacher, check_pair

    recipe = load_recipe(name)
    assert recipe.teacher is not None and recipe.teacher.recipe, f"{name}: names no teacher recipe"
    teacher_recipe = load_recipe(recipe.teacher.recipe)

    def build(spec):
        params = {**spec.params, "num_classes": 10}
        if "pretrained" in inspect.signature(student_entrypoint(spec.name)).parameters:
            params["pretrained"] = None
        return create_student(spec.name, **params)

    student, teacher = build(recipe.student), FrozenTeacher(build(teacher_recipe.student))
    losses = build_losses(recipe, student, teacher)
    assert losses, f"{name}: no distillation terms"
    check_pair(student.spec, teacher.spec, losses)
