"""One settings module: every environment variable imgsim reads is read here, with its default.

Nothing here imports torch, pyspark or PIL, so DAG files may import it at parse time.
Settings are read when ``Settings.from_env()`` is called, never at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

#: The project checkout (``include/imgsim/config.py`` -> project root).
PROJECT_ROOT = Path(__file__).resolve().parents[2]

#: Where Stanford Cars' all-in-one files are looked for by default, in this order: the Internet
#: Archive's copy of the original URL ("id_": the stored bytes as they were served), the older
#: imagenet.stanford.edu location pinned by several public loaders, then the original URL
#: (404 since 2023, kept in case it returns). Each must match the md5 those loaders pin.
#: None can be reached from CI; see README, "Indexing the real dataset".
STANFORD_ARCHIVE_URLS = (
    "https://web.archive.org/web/2023id_/http://ai.stanford.edu/~jkrause/car196/car_ims.tgz",
    "http://imagenet.stanford.edu/internal/car196/car_ims.tgz",
    "http://ai.stanford.edu/~jkrause/car196/car_ims.tgz",
)
STANFORD_LABELS_URLS = (
    "https://web.archive.org/web/2023id_/http://ai.stanford.edu/~jkrause/car196/cars_annos.mat",
    "http://imagenet.stanford.edu/internal/car196/cars_annos.mat",
    "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat",
)
STANFORD_ARCHIVE_URL = " ".join(STANFORD_ARCHIVE_URLS)
STANFORD_LABELS_URL = " ".join(STANFORD_LABELS_URLS)
STANFORD_ARCHIVE_CHECKSUM = "md5:d5c8f0aa497503f355e17dc7886c3f14"
STANFORD_LABELS_CHECKSUM = "md5:b407c6086d669747186bd1d764ff9dbc"
#: torchvision's published ResNet18_Weights.IMAGENET1K_V1 (sha256 prefix in the name).
RESNET18_WEIGHTS_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"

BACKBONES = ("resnet18", "efficientnet_lite0", "random")
#: How the backbone runs: PyTorch, or ONNX Runtime on the CPU in fp32 or static int8.
RUNTIMES = ("torch", "onnx", "onnx-int8")
#: Where the index DAG embeds: mapped Airflow tasks, or one Spark application.
EMBED_ENGINES = ("tasks", "spark")


#: the learned projection in front of the search (imgsim.projection)
PROJECTIONS = ("auto", "none", "whiten", "lda")
#: where it is learned: in the task (NumPy, streaming the store) or a Spark application
PROJECTION_ENGINES = ("auto", "local", "spark")


#: an exact scan answers instead of the LSH when the LSH would compare more than this share of
#: the index, or when references x dims is below SCAN_BELOW (imgsim.ann.search; measured by
#: benchmarks/bench_search.py)
SCAN_SHARE = 0.25
SCAN_BELOW = 4_000_000


class ConfigError(ValueError):
    """A setting has a value imgsim cannot use; the message names the variable."""


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = _env(name, str(default))
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not an integer") from exc
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = _env(name, str(default))
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _env_recall(name: str, default: float) -> float:
    value = _env_float(name, default)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name}={value} must be in (0, 1]")
    return value


def _env_share(name: str, default: float) -> float:
    value = _env_float(name, default)
    if value > 1.0:
        raise ConfigError(f"{name}={value} must be in [0, 1] (a share, e.g. 0.5 for 50%)")
    return value


def _env_date(name: str, default: str) -> str:
    from datetime import date

    raw = _env(name, default)
    try:
        return date.fromisoformat(raw).isoformat()
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a date (YYYY-MM-DD)") from exc


def check_checksum(value: str, source: str) -> str:
    """``md5:<hex>``/``sha256:<hex>`` (a bare 32/64-digit hex is md5/sha256) normalised, or ""."""
    import re

    raw = value.strip().lower()
    if not raw:
        return ""
    algorithm, sep, digest = raw.partition(":")
    if not sep:
        algorithm, digest = {32: "md5", 64: "sha256"}.get(len(raw), ""), raw
    if {"md5": 32, "sha256": 64}.get(algorithm) != len(digest) or not re.fullmatch(
            r"[0-9a-f]+", digest):
        raise ConfigError(f"{source}={value!r}: expected md5:<32 hex digits> or "
                          "sha256:<64 hex digits>")
    return f"{algorithm}:{digest}"


def _env_checksum(name: str, legacy_sha256: str, default: str) -> str:
    """``name`` if set, else the older ``*_SHA256`` setting (a bare sha256), else ``default``."""
    if _env(name, ""):
        return check_checksum(_env(name, ""), name)
    if _env(legacy_sha256, ""):
        return check_checksum("sha256:" + _env(legacy_sha256, "").strip(), legacy_sha256)
    return default


def check_choice(value: str, choices: tuple[str, ...], source: str, hint: str) -> str:
    """``value`` (case and spaces ignored) if it is one of ``choices``, else a ConfigError
    naming ``source``, the choices and what each means (``hint``)."""
    choice = value.strip().lower()
    if choice not in choices:
        raise ConfigError(f"{source}={value!r}; choose one of {', '.join(choices)} ({hint})")
    return choice


def check_embed_engine(value: str, source: str = "embed engine") -> str:
    return check_choice(value, EMBED_ENGINES, source,
                        "tasks: mapped Airflow tasks; spark: spark_jobs/embed_images.py")


def check_projection(value: str, source: str = "projection") -> str:
    return check_choice(value, PROJECTIONS, source, "auto: lda when labels cover the "
                        "references, else whiten; none: no projection")


def check_projection_engine(value: str, source: str = "projection engine") -> str:
    return check_choice(value, PROJECTION_ENGINES, source, "local: in the Airflow task; "
                        "spark: spark_jobs/learn_projection.py; auto: local up to "
                        "IMGSIM_PROJECTION_LOCAL_MAX references")


def check_runtime(value: str, source: str = "IMGSIM_RUNTIME") -> str:
    return check_choice(value, RUNTIMES, source, "torch: PyTorch; onnx: ONNX Runtime fp32; "
                        "onnx-int8: ONNX Runtime, static int8 quantization")


@dataclass(frozen=True)
class Layout:
    """The data root's layout (see README, "Data layout")."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    def incoming_day(self, day: str) -> Path:
        return self.incoming / day

    @property
    def thumbs(self) -> Path:
        return self.root / "thumbs"

    @property
    def catalog_dir(self) -> Path:
        return self.root / "catalog"

    @property
    def catalog(self) -> Path:
        return self.catalog_dir / "catalog.parquet"

    def embeddings(self, backbone: str) -> Path:
        return self.root / "embeddings" / backbone

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def models(self) -> Path:
        return self.root / "models" / "lsh"

    @property
    def staging(self) -> Path:
        return self.models / ".staging"

    @property
    def current_pointer(self) -> Path:
        return self.models / "CURRENT"

    @property
    def model_cache(self) -> Path:
        """Derived model files (ONNX exports, int8 models), keyed by the weights' sha256."""
        return self.root / "cache" / "models"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def queries(self) -> Path:
        return self.root / "queries"


@dataclass(frozen=True)
class Settings:
    data_root: Path = field(default_factory=lambda: PROJECT_ROOT / "data")
    archive_url: str = STANFORD_ARCHIVE_URL    # locations, separated by whitespace
    labels_url: str = STANFORD_LABELS_URL
    archive_checksum: str = STANFORD_ARCHIVE_CHECKSUM  # md5:<hex> or sha256:<hex>, "" = none
    labels_checksum: str = STANFORD_LABELS_CHECKSUM
    class_names_url: str = ""        # locations of cars_meta.mat or a names CSV ("" = none)
    min_label_coverage: float = 0.5  # share of archive images the labels must match (0 = off)
    backbone: str = "resnet18"
    weights_path: str = ""
    resnet18_weights_url: str = RESNET18_WEIGHTS_URL   # empty: never download the weights
    device: str = "auto"
    batch_size: int = 32
    shard_size: int = 1000
    num_threads: int = 0
    runtime: str = "torch"          # RUNTIMES: torch, onnx, onnx-int8
    embed_engine: str = "tasks"
    lsh_num_hash_tables: int = 0    # 0 = auto-tuned to reach target_recall
    lsh_bucket_length: float = 0.0   # 0 = auto, from the data's scale
    lsh_seed: int = 42
    recall_floor: float = 0.8
    target_recall: float = 0.95      # the LSH auto-tuner's recall@5 target (imgsim.ann.tuning)
    validation_sample: int = 200
    keep_versions: int = 5
    max_image_pixels: int = 90_000_000
    download_timeout_s: float = 60.0
    download_retries: int = 5
    query_roots: tuple[Path, ...] = ()
    query_schedule: str = "*/30 * * * *"
    index_start_date: str = "2026-01-01"
    lease_poke_s: float = 30.0
    lease_hold_s: float = 120.0       # a waiting index run keeps its worker slot this long ...
    lease_requeue_s: float = 300.0    # ... then is re-queued this much later
    projection: str = "auto"         # PROJECTIONS: auto, none, whiten, lda (imgsim.projection)
    projection_min_coverage: float = 0.5  # labelled share of the references lda needs
    projection_engine: str = "auto"  # auto, local, spark: where the projection is learned
    projection_local_max: int = 200_000  # auto: learn in the task up to this many references
    query_expansion: int = 0         # search again with each query + its first N answers (0 off)
    query_local_max: int = 200       # imgsim_query: up to this many queries in the task, else Spark
    scan_share: float = SCAN_SHARE   # scan exactly when the LSH would compare more than this
    scan_below: int = SCAN_BELOW     # ... or when references x dims is below this

    @classmethod
    def from_env(cls) -> Settings:
        backbone = _env("IMGSIM_BACKBONE", "resnet18")
        if backbone not in BACKBONES:
            raise ConfigError(f"IMGSIM_BACKBONE={backbone!r}; choose one of {', '.join(BACKBONES)}")
        embed_engine = check_embed_engine(_env("IMGSIM_EMBED_ENGINE", "tasks"),
                                          "IMGSIM_EMBED_ENGINE")
        # The pinned md5s belong to the default locations: other locations have no default.
        archive_url = " ".join(_env("IMGSIM_ARCHIVE_URL", STANFORD_ARCHIVE_URL).split())
        labels_url = " ".join(_env("IMGSIM_LABELS_URL", STANFORD_LABELS_URL).split())
        return cls(
            data_root=Path(_env("IMGSIM_DATA_ROOT", str(PROJECT_ROOT / "data"))).resolve(),
            archive_url=archive_url,
            labels_url=labels_url,
            archive_checksum=_env_checksum(
                "IMGSIM_ARCHIVE_CHECKSUM", "IMGSIM_ARCHIVE_SHA256",
                STANFORD_ARCHIVE_CHECKSUM if archive_url == STANFORD_ARCHIVE_URL else ""),
            labels_checksum=_env_checksum(
                "IMGSIM_LABELS_CHECKSUM", "IMGSIM_LABELS_SHA256",
                STANFORD_LABELS_CHECKSUM if labels_url == STANFORD_LABELS_URL else ""),
            class_names_url=" ".join(_env("IMGSIM_CLASS_NAMES_URL", "").split()),
            min_label_coverage=_env_share("IMGSIM_MIN_LABEL_COVERAGE", 0.5),
            backbone=backbone,
            weights_path=_env("IMGSIM_WEIGHTS", ""),
            resnet18_weights_url=os.environ.get("IMGSIM_RESNET18_WEIGHTS_URL",
                                                RESNET18_WEIGHTS_URL).strip(),
            device=_env("IMGSIM_DEVICE", "auto"),
            batch_size=_env_int("IMGSIM_BATCH_SIZE", 32, minimum=1),
            shard_size=_env_int("IMGSIM_SHARD_SIZE", 1000, minimum=1),
            num_threads=_env_int("IMGSIM_NUM_THREADS", 0),
            runtime=check_runtime(_env("IMGSIM_RUNTIME", "torch")),
            embed_engine=embed_engine,
            lsh_num_hash_tables=_env_int("IMGSIM_LSH_NUM_HASH_TABLES", 0, minimum=0),
            lsh_bucket_length=_env_float("IMGSIM_LSH_BUCKET_LENGTH", 0.0),
            lsh_seed=_env_int("IMGSIM_LSH_SEED", 42),
            recall_floor=_env_float("IMGSIM_RECALL_FLOOR", 0.8),
            target_recall=_env_recall("IMGSIM_TARGET_RECALL", 0.95),
            validation_sample=_env_int("IMGSIM_VALIDATION_SAMPLE", 200, minimum=1),
            keep_versions=_env_int("IMGSIM_KEEP_VERSIONS", 5, minimum=1),
            max_image_pixels=_env_int("IMGSIM_MAX_IMAGE_PIXELS", 90_000_000, minimum=1),
            download_timeout_s=_env_float("IMGSIM_DOWNLOAD_TIMEOUT_S", 60.0, minimum=0.1),
            download_retries=_env_int("IMGSIM_DOWNLOAD_RETRIES", 5),
            query_roots=tuple(Path(p).expanduser().resolve() for p in
                              _env("IMGSIM_QUERY_ROOTS", "").split(os.pathsep) if p),
            query_schedule=_env("IMGSIM_QUERY_SCHEDULE", "*/30 * * * *"),
            index_start_date=_env_date("IMGSIM_INDEX_START_DATE", "2026-01-01"),
            lease_poke_s=_env_float("IMGSIM_LEASE_POKE_S", 30.0, minimum=1.0),
            lease_hold_s=_env_float("IMGSIM_LEASE_HOLD_S", 120.0, minimum=0.0),
            lease_requeue_s=_env_float("IMGSIM_LEASE_REQUEUE_S", 300.0, minimum=30.0),
            projection=check_projection(_env("IMGSIM_PROJECTION", "auto"), "IMGSIM_PROJECTION"),
            projection_min_coverage=_env_share("IMGSIM_PROJECTION_MIN_COVERAGE", 0.5),
            projection_engine=check_projection_engine(_env("IMGSIM_PROJECTION_ENGINE", "auto"),
                                                      "IMGSIM_PROJECTION_ENGINE"),
            projection_local_max=_env_int("IMGSIM_PROJECTION_LOCAL_MAX", 200_000, minimum=1),
            query_expansion=_env_int("IMGSIM_QUERY_EXPANSION", 0),
            query_local_max=_env_int("IMGSIM_QUERY_LOCAL_MAX", 200),
            scan_share=_env_share("IMGSIM_SCAN_SHARE", SCAN_SHARE),
            scan_below=_env_int("IMGSIM_SCAN_BELOW", SCAN_BELOW),
        )

    @property
    def layout(self) -> Layout:
        return Layout(self.data_root)

    @property
    def archive_locations(self) -> list[str]:
        return self.archive_url.split()

    @property
    def labels_locations(self) -> list[str]:
        return self.labels_url.split()

    @property
    def class_names_locations(self) -> list[str]:
        return self.class_names_url.split()

    @property
    def allowed_query_roots(self) -> list[Path]:
        """Folders that query images named in Params may come from (always the data root)."""
        return [self.data_root, *self.query_roots]

    def as_dict(self) -> dict[str, object]:
        return {f.name: str(getattr(self, f.name)) if isinstance(getattr(self, f.name), Path)
                else getattr(self, f.name) for f in fields(self)}
