"""Trained embedders: a base backbone cut in two, its top trained on the references' labels.

The network is ``frozen`` (the base backbone's first stages) -> ``top`` (its last stages,
trained) -> global average pool -> ``head`` (a linear map to ``dim``) -> L2 normalisation. On
a CPU only ``top`` and ``head`` learn, from the frozen stages' outputs computed once
(:mod:`imgsim.training`); on a GPU every layer does. Where the cut falls, per base backbone:

* ``efficientnet_lite0``: stem and blocks 0-4 frozen (112 x 14 x 14 out), blocks 5-6, the 1x1
  head conv and its BatchNorm trained (1280-d before the head);
* ``resnet18`` and ``random`` (ResNet-18 with seeded random weights, for tests): conv1 to
  layer3 frozen (256 x 14 x 14 out), layer4 trained (512-d before the head).

A trained embedder is published as ``models/embedder/<version>/`` (:mod:`imgsim.versions.embedders`)
and named ``<base>@<version>`` wherever a backbone name goes: the embedding store of its vectors
(``embeddings/<base>@<version>/``), a model version's manifest, the query side. So an index
version records the embedder it was built with, and every reader embeds with that one.

torch and timm are imported inside functions only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgsim.errors import PermanentError

if TYPE_CHECKING:
    import torch

#: ``e20261207T081500Z-3fa9c2``: sortable like the index's versions, ``e`` for embedder.
EMBEDDER_VERSION_RE = re.compile(r"^e\d{8}T\d{6}Z-[0-9a-f]{6}$")
SEPARATOR = "@"
#: base backbone -> the frozen part's output (channels, height, width) for a 224 x 224 input
FROZEN_SHAPES: dict[str, tuple[int, int, int]] = {
    "efficientnet_lite0": (112, 14, 14),
    "resnet18": (256, 14, 14),
    "random": (256, 14, 14),
}
#: what the spec says was frozen on the CPU path
FROZEN_STAGES: dict[str, str] = {
    "efficientnet_lite0": "conv_stem, bn1, blocks[0:5]",
    "resnet18": "conv1, bn1, layer1-layer3",
    "random": "conv1, bn1, layer1-layer3",
}


#: the files of an embedder version (besides its manifest.json)
WEIGHTS = "embedder.pt"
ONNX = "embedder.onnx"
CURVE = "curve.json"
LABELS = "labels.json"  # image id -> class id of the references when it was trained


class EmbedderNotFound(LookupError, PermanentError):
    """No such embedder version (or none published)."""


class EmbedderDamaged(RuntimeError, PermanentError):
    """An embedder version's files differ from those its manifest recorded at publish."""

    def __init__(self, version: str, problems: list[str], where: Path) -> None:
        self.version, self.problems = version, problems
        super().__init__(
            f"embedder {version} is damaged: {'; '.join(problems[:3])}. Its files under {where} "
            "are not those recorded when it was published. Train again (`imgsim train`, or "
            "the imgsim_train DAG) or make another one current (`imgsim rollback` of an index "
            "version built with it)."
        )


def read_embedder_dir(folder: Path, *, hashes: bool = False) -> dict[str, Any]:
    """The manifest of the embedder version in ``folder``, its files checked against the sizes
    (and with ``hashes`` the sha256) it recorded at publish; :class:`EmbedderDamaged` if not."""
    from imgsim.fsutil import read_json, sha256_file

    version = folder.name
    try:
        manifest: dict[str, Any] = read_json(folder / "manifest.json")
    except FileNotFoundError as exc:
        raise EmbedderNotFound(f"embedder {version}: no manifest.json under {folder}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise EmbedderDamaged(
            version, [f"manifest.json is not valid JSON ({exc})"], folder
        ) from exc
    problems = []
    for rel, want in (manifest.get("files") or {}).items():
        f = folder / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{rel} has {f.stat().st_size} bytes, {want['size']} recorded")
        elif hashes and sha256_file(f) != want["sha256"]:
            problems.append(f"{rel}: sha256 differs from the one recorded")
    if not manifest.get("files"):
        problems.append("the manifest records no files")
    if problems:
        raise EmbedderDamaged(version, problems, folder)
    return manifest


class EmbedderError(ValueError, PermanentError):
    """A trained embedder cannot be named, found or loaded as asked."""


@dataclass(frozen=True)
class TrainedName:
    base: str
    version: str

    def __str__(self) -> str:
        return f"{self.base}{SEPARATOR}{self.version}"


def trained_name(base: str, version: str) -> str:
    """The backbone name of embedder ``version`` trained on ``base``."""
    if base not in FROZEN_SHAPES:
        raise EmbedderError(f"backbone {base!r} cannot be trained: use {sorted(FROZEN_SHAPES)}")
    if not EMBEDDER_VERSION_RE.match(version):
        raise EmbedderError(
            f"{version!r} is not an embedder version (like e20261207T081500Z-3fa9c2)"
        )
    return f"{base}{SEPARATOR}{version}"


def parse_trained_name(name: str) -> TrainedName | None:
    """``base@version`` -> its parts; a plain backbone name -> None; a bad one raises."""
    if SEPARATOR not in name:
        return None
    base, _, version = name.partition(SEPARATOR)
    trained_name(base, version)  # checks both parts
    return TrainedName(base, version)


def base_of(name: str) -> str:
    """The base backbone of a backbone name (itself when it is not a trained embedder)."""
    parsed = parse_trained_name(name)
    return parsed.base if parsed else name


def embedder_of(name: str) -> str:
    """The embedder version a backbone name names, else ``frozen``."""
    parsed = parse_trained_name(name) if name else None
    return parsed.version if parsed else "frozen"


def split_backbone(model: Any, base: str) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(frozen, top, feature dim) of a base backbone model as :func:`load_backbone` builds it."""
    import torch

    if base == "efficientnet_lite0":
        frozen = torch.nn.Sequential(model.conv_stem, model.bn1, *list(model.blocks)[:5])
        top = torch.nn.Sequential(*list(model.blocks)[5:], model.conv_head, model.bn2)
        return frozen, top, int(model.num_features)
    if base in ("resnet18", "random"):
        frozen = torch.nn.Sequential(
            model.conv1,
            model.bn1,
            model.relu,
            model.maxpool,
            model.layer1,
            model.layer2,
            model.layer3,
        )
        return frozen, torch.nn.Sequential(model.layer4), 512
    raise EmbedderError(f"backbone {base!r} cannot be trained: use {sorted(FROZEN_SHAPES)}")


def embedder_net(frozen: Any, top: Any, feat_dim: int, dim: int) -> torch.nn.Module:
    """The trainable embedder: frozen -> top -> mean pool -> linear -> L2-normalised ``dim``."""
    import torch
    import torch.nn.functional as F

    class EmbedderNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = frozen
            self.top = top
            self.head = torch.nn.Linear(feat_dim, dim)

        def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
            """Embeddings of the frozen part's outputs (the CPU path trains on these)."""
            z = self.top(maps).mean(dim=(2, 3))
            return F.normalize(self.head(z), dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.embed_maps(self.frozen(x))

    return EmbedderNet()
