"""The index DAG's source task bodies, called directly: run day, download -> extract -> catalog.

Mirrors are local HTTP servers on 127.0.0.1; the archives are tiny synthetic ones.
"""

from __future__ import annotations

import hashlib
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imgsim.catalog import LabelCoverageError, live_rows
from imgsim.config import Settings
from imgsim.demo import build_demo_archive, serve_directory, synthetic_car
from imgsim.index import pipeline
from imgsim.index.pipeline import PipelineError, run_day
from imgsim.sources.download import SourceUnavailable
from imgsim.sources.labels import write_cars_annos_mat

DAY = "2026-01-02"

pytestmark = pytest.mark.usefixtures("no_proxy")  # local servers only


def test_logical_date_wins() -> None:
    assert run_day("2026-01-03", datetime(2026, 5, 1, tzinfo=UTC)) == "2026-01-03"


def test_a_run_without_logical_date_reads_its_run_after_day() -> None:
    assert run_day(None, datetime(2026, 5, 1, 23, 59, tzinfo=UTC)) == "2026-05-01"


def test_neither_date_is_an_error() -> None:
    with pytest.raises(PipelineError, match="logical date"):
        run_day(None, None)


# -- helpers ----------------------------------------------------------------------------------


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_root=tmp_path / "data", download_timeout_s=5.0, download_retries=5)


@pytest.fixture
def demo(tmp_path: Path) -> tuple[Path, Path]:
    """A small car_ims.tgz (6 classes x 2) and its cars_annos.mat."""
    return build_demo_archive(tmp_path / "right", per_class=2)


@pytest.fixture
def mirrors(tmp_path: Path, demo: tuple[Path, Path]) -> Iterator[list[str]]:
    """Three mirrors: nothing there (404), other bytes under the right name, the right files."""
    (tmp_path / "empty").mkdir()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "car_ims.tgz").write_bytes(demo[0].read_bytes()[:-100] + b"\0" * 100)
    with ExitStack() as stack:
        yield [
            stack.enter_context(serve_directory(d))
            for d in (tmp_path / "empty", wrong, tmp_path / "right")
        ]


def index(settings: Settings, fetched: dict, **kwargs: object) -> dict:
    """extract -> catalog, as the DAG chains them."""
    archive = fetched["archive"]
    extracted = pipeline.extract(settings, archive["path"], archive["sha256"], archive["kind"])
    names = fetched.get("class_names")
    return pipeline.catalog(
        settings,
        extracted["root"],
        fetched["labels"]["path"],
        DAY,
        "manual__1",
        "random",
        class_names_path=names and names["path"],
        **kwargs,
    )


# -- mirrors (issue 12 item 1) ------------------------------------------------------------------


def test_run_indexes_from_the_third_mirror(
    settings: Settings, mirrors: list[str], demo: tuple[Path, Path]
) -> None:
    archive_urls = [f"{m}/car_ims.tgz" for m in mirrors]
    fetched = pipeline.download_sources(
        settings,
        archive_urls,
        " ".join(f"{m}/cars_annos.mat" for m in mirrors),
        f"md5:{md5(demo[0])}",
        f"md5:{md5(demo[1])}",
    )
    assert fetched["archive"]["url"] == archive_urls[2]
    assert fetched["archive"]["failed_locations"] == archive_urls[:2]
    assert fetched["archive"]["md5"] == md5(demo[0])
    assert fetched["class_names"] is None

    result = index(settings, fetched)
    assert (result["live"], result["to_embed"]) == (12, 12)
    assert result["label_coverage"] == {
        "labelled_images": 12,
        "images": 12,
        "classes": 6,
        "share": 1.0,
    }
    assert result["archive_label_coverage"] == result["label_coverage"]
    names = {r["class_name"] for r in live_rows(settings.layout)}
    assert names == {
        f"Synthetic {n}"
        for n in ("Red Sedan", "Blue Coupe", "Green SUV", "Yellow Cab", "Black Van", "White Pickup")
    }


def test_every_mirror_failing_says_what_happened_where_and_what_to_do(
    settings: Settings, mirrors: list[str], demo: tuple[Path, Path]
) -> None:
    urls = [f"{mirrors[0]}/car_ims.tgz", f"{mirrors[1]}/car_ims.tgz", "http://127.0.0.1:9/x.tgz"]
    settings = Settings(data_root=settings.data_root, download_retries=0, download_timeout_s=2)
    with pytest.raises(SourceUnavailable) as info:
        pipeline.download_sources(
            settings, urls, f"{mirrors[2]}/cars_annos.mat", f"md5:{md5(demo[0])}"
        )
    msg = str(info.value)
    assert f"1. {urls[0]}: HTTP 404" in msg
    assert f"2. {urls[1]}: checksum mismatch" in msg
    assert f"3. {urls[2]}: download of {urls[2]} failed after 1 attempt(s): connection error" in msg
    assert "Kaggle" in msg and "IMGSIM_ARCHIVE_URL" in msg and "Indexing the real dataset" in msg
    assert not info.value.permanent  # the unreachable one might come back
    assert not (settings.layout.raw / "car_ims.tgz").exists()


# -- permanent errors fail the task at once (issue 13 item 10) -----------------------------------


def test_a_permanent_download_error_fails_the_task_at_once(
    settings: Settings, mirrors: list[str]
) -> None:
    exceptions = pytest.importorskip("airflow.sdk.exceptions")
    started = time.monotonic()
    with (
        pytest.raises(exceptions.AirflowFailException, match="HTTP 404") as info,
        pipeline.fail_fast(downloads_retried=True),
    ):
        pipeline.download_sources(
            settings, f"{mirrors[0]}/car_ims.tgz", f"{mirrors[2]}/cars_annos.mat"
        )
    assert time.monotonic() - started < 5  # download_retries=5 would back off 31 s
    assert isinstance(info.value.__cause__, SourceUnavailable)
    # A mistyped URL with a space: two locations, each failing for good.
    with (
        pytest.raises(exceptions.AirflowFailException, match="no such file"),
        pipeline.fail_fast(downloads_retried=True),
    ):
        pipeline.download_sources(
            settings, f"{mirrors[2]}/car _ims.tgz", f"{mirrors[2]}/cars_annos.mat"
        )
    assert time.monotonic() - started < 10


def test_a_bad_archive_fails_the_task_at_once_a_disk_error_is_retried(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exceptions = pytest.importorskip("airflow.sdk.exceptions")
    bad = tmp_path / "car_ims.tgz"
    bad.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(exceptions.AirflowFailException, match="corrupt"), pipeline.fail_fast():
        pipeline.extract(settings, str(bad))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("imgsim.sources.archive.safe_extract", disk_full)
    with pytest.raises(OSError, match="No space"), pipeline.fail_fast():
        pipeline.extract(settings, str(bad))


# -- the archive is hashed once per run (issue 13 item 11) ---------------------------------------


def test_the_archive_is_read_for_its_hash_once_per_run(
    settings: Settings, demo: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import imgsim.sources.archive as archive_mod
    import imgsim.sources.download as download_mod

    hashed: list[str] = []
    real_digests, real_sha = download_mod.file_digests, archive_mod.sha256_file

    def digests(path: Path, *args: object) -> tuple[str, str]:
        hashed.append(Path(path).name)
        return real_digests(path)

    def sha(path: Path, *args: object) -> str:
        hashed.append(Path(path).name)
        return real_sha(path)

    monkeypatch.setattr(download_mod, "file_digests", digests)
    monkeypatch.setattr(archive_mod, "sha256_file", sha)
    fetched = pipeline.download_sources(
        settings, demo[0].as_uri(), demo[1].as_uri(), f"md5:{md5(demo[0])}"
    )
    a = fetched["archive"]
    pipeline.extract(settings, a["path"], a["sha256"], a["kind"])
    assert hashed.count("car_ims.tgz.part") + hashed.count("car_ims.tgz") == 1


# -- Kaggle layout and label coverage (issue 12 item 2) -------------------------------------------

KAGGLE = {
    "cars_train/00001.jpg": (1, 0),
    "cars_train/00002.jpg": (2, 1),
    "cars_train/00003.jpg": (1, 2),
    "cars_test/00001.jpg": (2, 2),
    "cars_test/00002.jpg": (1, 3),
}  # path -> (class, variant)


def kaggle_zip(path: Path) -> Path:
    """A Kaggle-layout archive: cars_train/ and cars_test/ with 5-digit names in both."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, (cls, variant) in KAGGLE.items():
            zf.writestr(f"stanford-cars/{name}", synthetic_car(cls - 1, variant, (64, 48)))
    return path


def test_kaggle_layout_with_the_official_mat_fails_with_the_coverage_message(
    settings: Settings, tmp_path: Path
) -> None:
    archive = kaggle_zip(tmp_path / "stanford-cars.zip")
    mat = tmp_path / "cars_annos.mat"
    write_cars_annos_mat(
        mat,
        [(f"car_ims/{i:06d}.jpg", 1 + i % 2) for i in range(1, 6)],
        ["Audi TT 2012", "BMW M3 2012"],
    )
    fetched = pipeline.download_sources(settings, str(archive), str(mat))
    with pytest.raises(LabelCoverageError) as info:
        index(settings, fetched)
    msg = str(info.value)
    assert "match 0 of the 5 images" in msg
    assert "cars_test/00001.jpg" in msg and "car_ims/000001.jpg" in msg
    assert "IMGSIM_MIN_LABEL_COVERAGE=0" in msg
    assert pipeline.is_permanent(info.value)
    assert not settings.layout.catalog.exists()  # nothing written

    allowed = index(settings, fetched, min_label_coverage=0)  # the user allows it
    assert allowed["label_coverage"]["share"] == 0.0 and allowed["live"] == 5


@pytest.mark.parametrize("as_folder", [False, True], ids=["zip", "unzipped-folder"])
def test_kaggle_layout_with_matching_csv_and_class_names_indexes_with_names(
    settings: Settings, tmp_path: Path, as_folder: bool
) -> None:
    archive = kaggle_zip(tmp_path / "stanford-cars.zip")
    if as_folder:  # an unzipped Kaggle download
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp_path / "kaggle")
        location = str(tmp_path / "kaggle" / "stanford-cars")
    else:
        location = archive.as_uri()
    csv = tmp_path / "labels.csv"
    csv.write_text(
        ",x1,y1,x2,y2,Class,image\n"
        + "".join(
            f"{i},0,0,9,9,{cls},{name}\n" for i, (name, (cls, _)) in enumerate(KAGGLE.items())
        )
    )
    names = tmp_path / "names.csv"
    names.write_text("Audi TT 2012\nBMW M3 2012\n")  # Kaggle names.csv: line i = class i

    fetched = pipeline.download_sources(settings, location, str(csv), "", "", str(names))
    assert fetched["archive"]["kind"] == ("folder" if as_folder else "file")
    result = index(settings, fetched)
    assert result["label_coverage"] == {
        "labelled_images": 5,
        "images": 5,
        "classes": 2,
        "share": 1.0,
    }
    by_path = {
        r["path"].rsplit("stanford-cars/", 1)[1]: (r["class_id"], r["class_name"])
        for r in live_rows(settings.layout)
    }
    assert by_path == {
        name: (cls, ["Audi TT 2012", "BMW M3 2012"][cls - 1]) for name, (cls, _) in KAGGLE.items()
    }
    if as_folder:  # read in place, through a link
        assert (settings.layout.images / "stanford-cars").is_symlink()
        assert not list(settings.layout.raw.glob("*.jpg"))


def test_class_names_beside_the_labels_are_used_when_none_is_given(
    settings: Settings, tmp_path: Path
) -> None:
    """The Kaggle CSV names classes by number; a names file in its folder (cars_meta.mat,
    class_names.csv or names.csv, as copies of the dataset carry) names them without
    IMGSIM_CLASS_NAMES_URL; with none there, the pages say "class N"."""
    archive = kaggle_zip(tmp_path / "stanford-cars.zip")
    labels = tmp_path / "labels" / "cardatasettrain.csv"
    labels.parent.mkdir()
    labels.write_text(
        ",x1,y1,x2,y2,Class,image\n"
        + "".join(
            f"{i},0,0,9,9,{cls},{name}\n" for i, (name, (cls, _)) in enumerate(KAGGLE.items())
        )
    )
    assert pipeline.names_beside(str(labels)) == []
    fetched = pipeline.download_sources(settings, archive.as_uri(), str(labels), "", "", "")
    assert fetched["class_names"] is None
    (labels.parent / "class_names.csv").write_text("Class,class_name\n1,Audi TT 2012\n2,BMW M3\n")
    assert pipeline.names_beside(labels.as_uri()) == [str(labels.parent / "class_names.csv")]
    fetched = pipeline.download_sources(settings, archive.as_uri(), str(labels), "", "", "")
    assert fetched["class_names"]["url"] == str(labels.parent / "class_names.csv")
    index(settings, fetched)
    assert {r["class_name"] for r in live_rows(settings.layout)} == {"Audi TT 2012", "BMW M3"}
    assert pipeline.names_beside("https://example.org/labels/cars_annos.mat") == []


def test_a_folder_name_taken_by_an_extracted_archive_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "car_ims"
    folder.mkdir()
    (settings.layout.images / "car_ims").mkdir(parents=True)
    with pytest.raises(pipeline.SourceError, match="not a link"):
        pipeline.extract(settings, str(folder), kind="folder")


# -- settings for the sources ---------------------------------------------------------------------


def _settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for key in (
        "IMGSIM_ARCHIVE_URL",
        "IMGSIM_LABELS_URL",
        "IMGSIM_ARCHIVE_CHECKSUM",
        "IMGSIM_LABELS_CHECKSUM",
        "IMGSIM_ARCHIVE_SHA256",
        "IMGSIM_LABELS_SHA256",
        "IMGSIM_CLASS_NAMES_URL",
        "IMGSIM_MIN_LABEL_COVERAGE",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings.from_env()


def test_default_sources_are_mirrors_pinned_to_the_published_md5s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = _settings(monkeypatch)
    assert len(s.archive_locations) == len(s.labels_locations) == 3
    assert all(u.endswith("/car_ims.tgz") for u in s.archive_locations)
    assert s.archive_locations[0].startswith("https://web.archive.org/")
    assert s.archive_checksum == "md5:d5c8f0aa497503f355e17dc7886c3f14"
    assert s.labels_checksum == "md5:b407c6086d669747186bd1d764ff9dbc"
    assert (s.class_names_locations, s.min_label_coverage) == ([], 0.5)


def test_source_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    sha = "ab" * 32
    s = _settings(
        monkeypatch,
        IMGSIM_ARCHIVE_URL=" /a/car_ims.tgz\n  http://m/car_ims.tgz ",
        IMGSIM_LABELS_URL="/a/labels.csv",
        IMGSIM_LABELS_SHA256=sha,
        IMGSIM_CLASS_NAMES_URL="/a/names.csv",
        IMGSIM_MIN_LABEL_COVERAGE="0",
    )
    assert s.archive_locations == ["/a/car_ims.tgz", "http://m/car_ims.tgz"]
    assert s.archive_checksum == ""  # the pinned md5 is for the default list only
    assert s.labels_checksum == f"sha256:{sha}"  # the older *_SHA256 setting still works
    assert (s.class_names_locations, s.min_label_coverage) == (["/a/names.csv"], 0.0)
    s = _settings(monkeypatch, IMGSIM_ARCHIVE_CHECKSUM="MD5:" + "C" * 32, IMGSIM_ARCHIVE_SHA256=sha)
    assert s.archive_checksum == "md5:" + "c" * 32  # the new setting wins


@pytest.mark.parametrize(
    "env",
    [
        {"IMGSIM_ARCHIVE_CHECKSUM": "md5:123"},
        {"IMGSIM_LABELS_CHECKSUM": "sha1:" + "a" * 40},
        {"IMGSIM_ARCHIVE_SHA256": "xyz"},
        {"IMGSIM_MIN_LABEL_COVERAGE": "50"},
    ],
)
def test_bad_source_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    from imgsim.config import ConfigError

    with pytest.raises(ConfigError, match=next(iter(env))):
        _settings(monkeypatch, **env)
