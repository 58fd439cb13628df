"""One settings module: every environment variable imgsim reads is declared here, once, with its
default (:class:`Settings`); the DAGs' Params, the Spark jobs' arguments and the embed job take
their defaults from it (:func:`setting_default`).

Nothing here imports torch, pyspark or PIL, so DAG files may import it at parse time.
Settings are read when ``Settings.from_env()`` is called, never at import time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, ValidationInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings import PydanticBaseSettingsSource as Source

from imgsim.errors import PermanentError

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
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
TRAIN_MODES = ("auto", "top", "full")
TRAIN_PUBLISH = ("better", "always")
#: Where the index DAG embeds: mapped Airflow tasks, or one Spark application.
EMBED_ENGINES = ("tasks", "spark")
#: the learned projection in front of the search (imgsim.ann.projection)
PROJECTIONS = ("auto", "none", "whiten", "lda")
#: where it is learned: in the task (NumPy, streaming the store) or a Spark application
PROJECTION_ENGINES = ("auto", "local", "spark")
DUPLICATE_VERIFIERS = ("orb", "none")


class ConfigError(ValueError, PermanentError):
    """A setting has a value imgsim cannot use; the message names the variable."""


def check_checksum(value: str, source: str) -> str:
    """``md5:<hex>``/``sha256:<hex>`` (a bare 32/64-digit hex is md5/sha256) normalised, or ""."""
    raw = value.strip().lower()
    if not raw:
        return ""
    algorithm, sep, digest = raw.partition(":")
    if not sep:
        algorithm, digest = {32: "md5", 64: "sha256"}.get(len(raw), ""), raw
    if {"md5": 32, "sha256": 64}.get(algorithm) != len(digest) or not re.fullmatch(
        r"[0-9a-f]+", digest
    ):
        raise ConfigError(
            f"{source}={value!r}: expected md5:<32 hex digits> or sha256:<64 hex digits>"
        )
    return f"{algorithm}:{digest}"


def check_choice(value: str, choices: tuple[str, ...], source: str, hint: str) -> str:
    """``value`` (case and spaces ignored) if it is one of ``choices``, else a ConfigError
    naming ``source``, the choices and what each means (``hint``)."""
    choice = value.strip().lower()
    if choice not in choices:
        raise ConfigError(f"{source}={value!r}; choose one of {', '.join(choices)} ({hint})")
    return choice


def default_model_cache() -> Path:
    """``$XDG_CACHE_HOME/imgsim/models`` (``~/.cache/imgsim/models``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgsim" / "models"


#: the settings that take one of a few values: (the values, what each means)
CHOICES: dict[str, tuple[tuple[str, ...], str]] = {
    "backbone": (BACKBONES, "the CNN that embeds the images; random: for tests"),
    "runtime": (
        RUNTIMES,
        "auto: the runtime the store was built with, else onnx on a CPU and torch on a GPU; "
        "torch: PyTorch; onnx: ONNX Runtime fp32; onnx-int8: ONNX Runtime, static int8",
    ),
    "embed_engine": (
        EMBED_ENGINES,
        "tasks: mapped Airflow tasks; spark: spark_jobs/embed_images.py",
    ),
    "projection": (
        PROJECTIONS,
        "auto: lda when labels cover the references, else whiten; none: no projection",
    ),
    "train_mode": (
        TRAIN_MODES,
        "auto: top on a CPU, full on a GPU; top: the frozen stages' outputs cached once and "
        "only the top stages and the head trained; full: every layer, with random-resized-crop "
        "and flip augmentation of the images",
    ),
    "train_publish": (
        TRAIN_PUBLISH,
        "better: publish a trained embedder only if its held-out hit@1 beats the frozen "
        "backbone + LDA on the same photos; always: publish it regardless (experiments; the "
        "manifest records both)",
    ),
    "duplicate_verifier": (
        DUPLICATE_VERIFIERS,
        "orb: a candidate pair is one photo only when ORB keypoints of the two thumbnails "
        "match on one RANSAC transform (mirror included); none: every pair under the distance",
    ),
    "projection_engine": (
        PROJECTION_ENGINES,
        "local: in the Airflow task; spark: spark_jobs/learn_projection.py; auto: local up to "
        "IMGSIM_PROJECTION_LOCAL_MAX references",
    ),
}


def check_setting(name: str, value: str, source: str = "") -> str:
    """``value`` for the choice setting ``name`` (:data:`CHOICES`), else a ConfigError naming
    ``source`` (default: the setting's variable), the values and what each means."""
    choices, hint = CHOICES[name]
    return check_choice(value, choices, source or env_name(name), hint)


Share = Annotated[float, Field(ge=0, le=1)]
Words = Annotated[str, AfterValidator(lambda text: " ".join(text.split()))]
ResolvedPath = Annotated[Path, AfterValidator(lambda path: path.expanduser().resolve())]
Paths = Annotated[
    tuple[ResolvedPath, ...],
    NoDecode,
    BeforeValidator(  # a:b:c
        lambda value: [p for p in value.split(os.pathsep) if p] if isinstance(value, str) else value
    ),
]

#: pydantic's error types -> what is wrong with the value, after "IMGSIM_X=<value> "
_REASONS = {
    "int_parsing": "is not an integer",
    "int_from_float": "is not an integer",
    "float_parsing": "is not a number",
    "finite_number": "is not a number",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
}
#: the older variables of two settings: a bare sha256, read when the setting is not set
_LEGACY = {"archive_checksum": "IMGSIM_ARCHIVE_SHA256", "labels_checksum": "IMGSIM_LABELS_SHA256"}


def env_name(field: str) -> str:
    """The environment variable of setting ``field``: IMGSIM_<FIELD>, or its alias."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else f"IMGSIM_{field.upper()}"


def env_names() -> list[str]:
    """Every environment variable :meth:`Settings.from_env` reads."""
    return [*map(env_name, Settings.model_fields), *_LEGACY.values()]


def _problem(error: Mapping[str, Any]) -> str:  # the variable, the bad value, what is wrong
    ctx = error.get("ctx", {})
    if isinstance(ctx.get("error"), ConfigError):  # a check_* function named the variable
        return str(ctx["error"])
    template = _REASONS.get(error["type"])
    reason = (
        str(ctx["error"])
        if "error" in ctx
        else (template.format(**ctx) if template else error["msg"])
    )
    if error["type"] == "less_than_equal" and ctx.get("le") == 1:
        reason += " (a share: e.g. 0.5 for 50%)"
    name = str(error["loc"][0]) if error["loc"] else "settings"
    name = env_name(name) if name in Settings.model_fields else name  # else an alias or unknown
    return f"{name}={error['input']!r} {reason}"


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

    def backbone_record(self, backbone: str) -> Path:
        """What the store of ``backbone`` was built with (weights, preprocessing, runtime)."""
        return self.embeddings(backbone) / "BACKBONE.json"

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
    def embedders(self) -> Path:
        """Trained embedder versions (imgsim.versions.embedders) and their CURRENT pointer."""
        return self.root / "models" / "embedder"

    @property
    def current_pointer(self) -> Path:
        return self.models / "CURRENT"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def queries(self) -> Path:
        return self.root / "queries"


class Settings(BaseSettings):
    """Each from IMGSIM_<NAME> (``weights_path``: IMGSIM_WEIGHTS) by :meth:`from_env`; bare
    ``Settings()`` is the defaults, ``Settings(name=value)`` and ``.replace(name=value)`` change
    some. All validate alike and raise :class:`ConfigError`."""

    model_config = SettingsConfigDict(
        env_prefix="IMGSIM_",
        env_ignore_empty=True,
        frozen=True,
        validate_by_name=True,
        allow_inf_nan=False,
    )

    data_root: ResolvedPath = PROJECT_ROOT / "data"
    # The title and description of a setting are also those of the DAG Param it defaults
    # (imgsim.params), and its limits bound both.
    archive_url: Words = Field(  # locations, separated by whitespace
        STANFORD_ARCHIVE_URL,
        title="Archive locations (one per line, tried in order)",
        description="https://, http://, file:// URLs or local paths of the image archive "
        "(car_ims.tgz or a Kaggle-layout zip/tgz), or a local folder that holds the images",
    )
    labels_url: Words = Field(
        STANFORD_LABELS_URL,
        title="Labels locations (one per line, tried in order)",
        description="cars_annos.mat or a CSV with Class and image columns",
    )
    # md5:<hex> or sha256:<hex>, "" = none; pinned for the default locations only
    archive_checksum: str = Field(
        STANFORD_ARCHIVE_CHECKSUM,
        title="Archive checksum (optional)",
        description="md5:<hex> or sha256:<hex> (a bare 64-digit hex is sha256); a location "
        "serving other bytes is refused and the next one tried",
    )
    labels_checksum: str = Field(STANFORD_LABELS_CHECKSUM, title="Labels checksum (optional)")
    class_names_url: Words = ""  # locations of cars_meta.mat or a names CSV ("" = none)
    min_label_coverage: Share = Field(
        0.5,
        title="Minimum label coverage (0 = off)",
        description="share of the archive's images the labels must name, else the run fails "
        "at catalog",
    )
    backbone: str = Field(
        "resnet18",
        title="Backbone",
        description="CNN that embeds the images",
    )
    weights_path: str = Field("", validation_alias="IMGSIM_WEIGHTS")
    resnet18_weights_url: Words = RESNET18_WEIGHTS_URL  # empty: never download the weights
    device: str = "auto"
    batch_size: int = Field(32, ge=1)
    shard_size: int = Field(1000, ge=1)
    num_threads: int = Field(0, ge=0)
    runtime: str = "auto"  # RUNTIMES: auto, torch, onnx, onnx-int8 (imgsim.embedding.backbones)
    # ONNX exports, shared by every data root on this machine (keyed by the weights' sha256)
    model_cache: ResolvedPath = Field(default_factory=default_model_cache)
    embed_engine: str = Field(
        "tasks",
        title="Embedding engine",
        description="tasks: one mapped Airflow task per shard; spark: one Spark application "
        "(spark_default) for large backfills. Both write the same vectors.",
    )
    lsh_num_hash_tables: int = Field(
        0,
        ge=0,
        le=512,
        title="LSH hash tables (numHashTables, 0 = auto)",
        description="0 auto-tunes numHashTables and bucketLength to reach IMGSIM_TARGET_RECALL "
        "on a sample",
    )
    lsh_bucket_length: float = Field(
        0.0,
        ge=0,
        le=100,
        title="LSH bucket length (0 = auto)",
        description="bucket width of the projections of L2-normalised vectors; 0 derives it "
        "from the data's scale",
    )
    lsh_seed: int = Field(42, ge=0)
    recall_floor: float = Field(0.8, ge=0)
    target_recall: float = Field(0.95, gt=0, le=1)  # the LSH auto-tuner's recall@5 target
    validation_sample: int = Field(200, ge=1)
    keep_versions: int = Field(5, ge=1)
    max_image_pixels: int = Field(90_000_000, ge=1)
    uploads_max_mb: int = Field(1024, ge=1)  # the UI's uploads folder: oldest go past this
    ui_preload: bool = True  # the upload page loads the model and CNN in the background
    download_timeout_s: float = Field(60.0, ge=0.1)
    download_retries: int = Field(5, ge=0)
    query_roots: Paths = ()  # folders query images may also come from
    query_schedule: str = "*/30 * * * *"
    index_start_date: str = "2026-01-01"
    lease_poke_s: float = Field(30.0, ge=1.0)
    lease_hold_s: float = Field(120.0, ge=0.0)  # a waiting index run keeps its slot this long
    lease_requeue_s: float = Field(300.0, ge=30.0)  # ... then is re-queued this much later
    # another deployment's lease without a heartbeat this long is taken over (runlease)
    lease_ttl_s: float = Field(10_800.0, ge=60.0)
    deployment_id: str = ""  # "": a hash of the Airflow metadata DB's URL (runlease)
    projection: str = Field(  # imgsim.ann.projection
        "auto",
        title="Projection (search space)",
        description="auto: Fisher LDA learned from the labels when they cover the index, else "
        "PCA-whitening; lda, whiten, or none (L2-normalised embeddings as they are)",
    )
    projection_min_coverage: Share = 0.5  # labelled share of the references lda needs
    projection_refresh: Share = Field(
        0.05,
        title="Projection refresh",
        description="an index run keeps CURRENT's projection (the search space) while the "
        "references added or gone since it was learned are at most this share of those it "
        "was learned on (and none was relabelled, no class is new); the fit job then updates "
        "CURRENT's exact neighbour graph instead of rescanning. 0: learned anew every run",
    )
    projection_engine: str = "auto"  # auto, local, spark: where the projection is learned
    projection_local_max: int = Field(200_000, ge=1)  # auto: in the task up to this many refs
    query_expansion: int = Field(0, ge=0)  # search again with each query + its first N answers
    query_local_max: int = Field(200, ge=0)  # imgsim_query: up to this many in the task
    # exact scan, not the LSH, when the LSH would compare more than scan_share of the index or
    # references x dims is below scan_below (imgsim.ann.search; benchmarks/bench_search.py)
    scan_share: Share = 0.25
    scan_below: int = Field(4_000_000, ge=0)
    # the version's neighbour graph and near-duplicate groups (imgsim.jobs.neighbour_graph)
    graph_k: int = Field(
        10,
        ge=0,
        le=100,
        title="Neighbours per reference in the graph (0 = no graph)",
        description="each reference's k nearest references, computed by the fit job from the "
        "graph's own k-means cells (learned per version); 0 skips the graph and the "
        "near-duplicate groups",
    )
    graph_bucket_cap: int = Field(1000, ge=2)  # graph cells hold ~1/4 of it; more: split
    # 0: the distance measured on copies of sample photos (imgsim.ann.graph
    # DUPLICATE_DISTANCE, benchmarks/bench_duplicates.py)
    duplicate_distance: float = Field(
        0.0,
        ge=0,
        le=2,
        title="Near-duplicate distance",
        description="pairs at or under this distance between the L2-normalised embeddings "
        "join near-duplicate groups (where the search space is a projection, each image's "
        "5 nearest in the graph are rescored between the embeddings); 0: the distance "
        "measured on copies of sample photos (0.41)",
    )
    duplicate_verifier: str = "orb"  # imgsim.ann.copies: is a candidate pair the same photo
    duplicate_min_inliers: int = Field(0, ge=0)  # 0: imgsim.ann.copies.MIN_INLIERS (measured)
    # the version's 2-D map (imgsim.ann.layout, imgsim.jobs.version_map); 0: no map
    map_points: int = Field(
        4000,
        ge=0,
        le=20000,
        title="References on the map",
        description="the fit job lays out (t-SNE) a sample of about this many references, "
        "chosen by image id, and stores the map with the version; 0: no map",
    )

    # the trained embedder (imgsim.training, imgsim.embedding.trained)
    embedder: str = Field(
        "current",
        title="Embedder",
        description="current: the data root's CURRENT trained embedder when it was trained on "
        "the backbone, else the frozen backbone; frozen: the backbone as it is; or an embedder "
        "version (e20261207T081500Z-3fa9c2). A different embedder than the current index's "
        "re-embeds every reference",
    )
    train_schedule: str = "@weekly"  # imgsim_train's timetable (also runs after each publish)
    train_refresh: Share = Field(
        0.1,
        title="Retrain when the labels changed by",
        description="after an index publish, imgsim_train retrains when the labelled "
        "references grew or changed by more than this share of those the embedder was "
        "trained on, or gained a class",
    )
    train_epochs: int = Field(8, ge=1, le=200, title="Training epochs")
    train_mode: str = "auto"  # TRAIN_MODES
    train_holdout: Share = 0.1  # share of each class's labelled photos held out (picks the epoch)
    train_dim: int = Field(512, ge=8, le=4096)  # the trained embedding's dimensions
    train_batch_size: int = Field(64, ge=2)
    train_lr: float = Field(0.002, gt=0, le=1)  # AdamW's peak (one-cycle) learning rate
    train_seed: int = Field(0, ge=0)
    train_min_images: int = Field(20, ge=2)  # fewer labelled photos: no training
    train_publish: str = "better"  # TRAIN_PUBLISH

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:  # the one place pydantic's errors become imgsim's
            raise ConfigError("; ".join(_problem(e) for e in exc.errors())) from exc

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: Source,
        *sources: Source,
        **named: Source,
    ) -> tuple[Source, ...]:
        return (init_settings,)  # the keywords only: the environment is read by from_env

    @classmethod
    def from_env(cls) -> Settings:
        """The settings in the environment (an empty variable is an unset one), else defaults."""
        values: dict[str, Any] = EnvSettingsSource(cls)()
        for field, legacy in _LEGACY.items():
            if field not in values and os.environ.get(legacy):
                values[field] = check_checksum(f"sha256:{os.environ[legacy].strip()}", legacy)
        url = os.environ.get("IMGSIM_RESNET18_WEIGHTS_URL")
        if url is not None:  # set but empty: never download the weights
            values["resnet18_weights_url"] = url
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``, validated (``dataclasses.replace`` for Settings)."""
        return type(self)(**{**self.model_dump(), **changes})

    @pydantic.model_validator(mode="before")
    @classmethod
    def _pinned_checksums(cls, data: Any) -> Any:  # other locations have no default checksum
        for kind, url in (("archive", STANFORD_ARCHIVE_URL), ("labels", STANFORD_LABELS_URL)):
            given = " ".join(str(data.get(f"{kind}_url", url)).split())
            if f"{kind}_checksum" not in data and given != url:
                data = {**data, f"{kind}_checksum": ""}
        return data

    @pydantic.field_validator("archive_checksum", "labels_checksum")
    @classmethod
    def _checksum(cls, value: str, info: ValidationInfo) -> str:
        return check_checksum(value, env_name(str(info.field_name)))

    @pydantic.field_validator(*CHOICES)
    @classmethod
    def _choice(cls, value: str, info: ValidationInfo) -> str:
        return check_setting(str(info.field_name), value)

    @pydantic.field_validator("index_start_date")
    @classmethod
    def _date(cls, value: str) -> str:
        try:
            return date.fromisoformat(value).isoformat()
        except ValueError:
            raise ValueError("is not a date (YYYY-MM-DD)") from None

    @pydantic.field_validator("embedder")
    @classmethod
    def _embedder(cls, value: str) -> str:
        value = value.strip()
        if value in ("current", "frozen") or re.fullmatch(r"e\d{8}T\d{6}Z-[0-9a-f]{6}", value):
            return value
        raise ValueError(
            "must be current, frozen or an embedder version such as e20261207T081500Z-3fa9c2"
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
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.model_dump().items()}


def setting_default(name: str) -> Any:
    """Setting ``name``'s declared default, for what defaults to it elsewhere (the Spark jobs'
    arguments, the embed job, library functions): each default is written once, above."""
    return Settings.model_fields[name].default


SCAN_SHARE: float = setting_default("scan_share")
SCAN_BELOW: int = setting_default("scan_below")
