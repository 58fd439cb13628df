"""Label readers: the official cars_annos.mat, the Kaggle CSV, errors, and image listing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from imgsim.sources.labels import (
    LabelRecord,
    LabelsError,
    find_images,
    match_labels,
    read_cars_annos_mat,
    read_class_names,
    read_labels,
    read_labels_csv,
    with_class_names,
    write_cars_annos_mat,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LABELS_DIR = SHARED_DATA / "stanford_cars_labels"
SAMPLE_DIR = SHARED_DATA / "stanford_cars_sample"


def _shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared Stanford Cars data not available: {path} is absent")
    return path


# --- real files -------------------------------------------------------------------------


def test_real_cars_annos_mat() -> None:
    labels = read_labels(_shared(LABELS_DIR / "cars_annos.mat"))
    assert len(labels) == 16_185
    assert len({r.class_id for r in labels.values()}) == 196
    assert labels["car_ims/000001.jpg"] == LabelRecord(
        "car_ims/000001.jpg", 1, "AM General Hummer SUV 2000"
    )
    assert set(labels) == {f"car_ims/{i:06d}.jpg" for i in range(1, 16_186)}
    with open(_shared(LABELS_DIR / "car_ims_to_split.csv"), newline="") as fh:
        expected = {
            r["car_ims_image"]: (int(r["Class"]), r["class_name"]) for r in csv.DictReader(fh)
        }
    assert {
        k.removeprefix("car_ims/"): (r.class_id, r.class_name) for k, r in labels.items()
    } == expected


def test_real_kaggle_csv() -> None:
    labels = read_labels(_shared(LABELS_DIR / "cardatasettrain.csv"))
    assert len(labels) == 8_144
    assert labels["00001.jpg"] == LabelRecord("00001.jpg", 14, None)
    assert {r.class_id for r in labels.values()} == set(range(1, 197))
    # The devkit .mat for the same split agrees record by record.
    devkit = read_labels(_shared(LABELS_DIR / "cars_train_annos.mat"))
    assert {k: r.class_id for k, r in devkit.items()} == {k: r.class_id for k, r in labels.items()}


def test_real_sample_labels_with_class_names() -> None:
    labels = read_labels_csv(_shared(SAMPLE_DIR / "labels.csv"))
    assert len(labels) == 1_960
    assert all(r.class_name for r in labels.values())
    assert labels["00002.jpg"] == LabelRecord("00002.jpg", 3, "Acura TL Sedan 2012")
    images = find_images(_shared(SAMPLE_DIR / "images"))
    assert {p.name for p in images} == set(labels)


def test_real_files_without_labels_are_refused() -> None:
    with pytest.raises(LabelsError, match=r"lacks column\(s\) Class"):
        read_labels(_shared(LABELS_DIR / "cardatasettest.csv"))
    with pytest.raises(LabelsError, match="header row"):
        read_labels(_shared(LABELS_DIR / "anno_train.csv"))  # no header
    with pytest.raises(LabelsError, match="class"):
        read_labels(_shared(LABELS_DIR / "cars_test_annos.mat"))


def test_written_mat_matches_official_structure(tmp_path: Path) -> None:
    import scipy.io

    official = scipy.io.loadmat(_shared(LABELS_DIR / "cars_annos.mat"))
    path = tmp_path / "cars_annos.mat"
    write_cars_annos_mat(
        path, [("000001.jpg", 1, 112, 7, 853, 717, 0)], ["AM General Hummer SUV 2000"]
    )
    ours = scipy.io.loadmat(path)
    assert ours["annotations"].dtype == official["annotations"].dtype
    mine, theirs = ours["annotations"][0, 0], official["annotations"][0, 0]
    for field in official["annotations"].dtype.names:
        assert mine[field].dtype == theirs[field].dtype, field
        assert mine[field].shape == theirs[field].shape, field
        assert (mine[field] == theirs[field]).all(), field
    assert ours["class_names"].dtype == official["class_names"].dtype
    assert ours["class_names"][0, 0].tolist() == official["class_names"][0, 0].tolist()


# --- synthetic files ----------------------------------------------------------------------


def test_mat_round_trip(tmp_path: Path) -> None:
    names = [f"Make Model {i} 2012" for i in range(1, 197)]
    records = [(f"{i:06d}.jpg", (i % 196) + 1) for i in range(1, 401)]
    records.append(("car_ims/000999.jpg", 196))
    path = tmp_path / "labels" / "cars_annos.mat"
    write_cars_annos_mat(path, records, names)
    for labels in (read_labels(path), read_cars_annos_mat(path)):
        assert len(labels) == len(records)
        assert labels["car_ims/000001.jpg"] == LabelRecord(
            "car_ims/000001.jpg", 2, "Make Model 2 2012"
        )
        assert labels["car_ims/000999.jpg"].class_id == 196
        assert labels["car_ims/000999.jpg"].class_name == "Make Model 196 2012"
    assert [p.name for p in path.parent.iterdir()] == ["cars_annos.mat"]  # no temp files left


def test_mat_write_rejects_bad_class(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class_id"):
        write_cars_annos_mat(tmp_path / "x.mat", [("000001.jpg", 3)], ["a", "b"])
    assert not (tmp_path / "x.mat").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_keys_by_stored_path_and_ignores_extra_columns(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "train.csv",
        ",x1,y1,x2,y2,Class,image\n0,1,2,3,4,14,./cars_train/00001.jpg\n1,1,2,3,4,3,00002.jpg\n"
        "2,1,2,3,4,5,cars_test\\00001.jpg\n\n",
    )
    assert read_labels(path) == {
        "cars_train/00001.jpg": LabelRecord("cars_train/00001.jpg", 14, None),
        "00002.jpg": LabelRecord("00002.jpg", 3, None),
        "cars_test/00001.jpg": LabelRecord("cars_test/00001.jpg", 5, None),
    }


def test_csv_missing_column_message(tmp_path: Path) -> None:
    path = _write(tmp_path / "test.csv", ",x1,y1,x2,y2,image\n0,1,2,3,4,00001.jpg\n")
    with pytest.raises(LabelsError) as info:
        read_labels(path)
    message = str(info.value)
    assert str(path) in message
    assert "lacks column(s) Class" in message
    assert "found ['', 'x1', 'y1', 'x2', 'y2', 'image']" in message


def test_csv_column_names_are_case_sensitive(tmp_path: Path) -> None:
    path = _write(tmp_path / "lower.csv", "class,image\n1,00001.jpg\n")
    with pytest.raises(LabelsError, match="Class"):
        read_labels_csv(path)


@pytest.mark.parametrize("bad", ["abc", "", "0", "-3", "2.5"])
def test_csv_bad_class_names_the_line(tmp_path: Path, bad: str) -> None:
    path = _write(tmp_path / "bad.csv", f"Class,image\n1,00001.jpg\n2,00002.jpg\n{bad},00003.jpg\n")
    with pytest.raises(LabelsError, match=r"line 4") as info:
        read_labels(path)
    assert str(path) in str(info.value) and repr(bad) in str(info.value)


def test_csv_empty_image_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.csv", "Class,image\n1,00001.jpg\n2,  \n")
    with pytest.raises(LabelsError, match="line 3: empty image"):
        read_labels(path)


def test_csv_duplicate_image_with_other_class(tmp_path: Path) -> None:
    same = _write(tmp_path / "same.csv", "Class,image\n5,a/00001.jpg\n5,./a/00001.jpg\n")
    assert read_labels(same) == {"a/00001.jpg": LabelRecord("a/00001.jpg", 5, None)}
    other = _write(tmp_path / "other.csv", "Class,image\n5,00001.jpg\n6,00001.jpg\n")
    with pytest.raises(LabelsError, match=r"'00001.jpg' has two classes"):
        read_labels(other)


def test_csv_with_class_name_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "named.csv"
    path.write_bytes(
        b"\xef\xbb\xbfimage,Class,class_name\n00002.jpg,3,Acura TL Sedan 2012\n00003.jpg,4,\n"
    )
    labels = read_labels(path)
    assert labels["00002.jpg"].class_name == "Acura TL Sedan 2012"
    assert labels["00003.jpg"].class_name is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty"),
        (b"\x00\x01\x02binary junk", "neither"),
        (b"\x89HDF\r\n\x1a\n" + b"\x00" * 100, "v7.3"),
        (b"MATLAB 5.0 MAT-file, but then garbage" + b"\x00" * 10, "mat"),
        (b"\xff\xfe\xfa not utf-8\n", "UTF-8"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "labels.bin"
    path.write_bytes(content)
    with pytest.raises(LabelsError, match=problem) as info:
        read_labels(path)
    assert str(path) in str(info.value)


def test_mat_without_annotations(tmp_path: Path) -> None:
    import numpy as np
    import scipy.io

    path = tmp_path / "other.mat"
    scipy.io.savemat(path, {"something": np.zeros(3)})
    with pytest.raises(LabelsError, match="no 'annotations'"):
        read_labels(path)


def test_find_images(tmp_path: Path) -> None:
    wanted = ["a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.Jpg"]
    ignored = [
        ".hidden.jpg",
        ".tmp-x.jpg",
        "notes.txt",
        "e.gif",
        ".cache/f.jpg",
        ".tmp-extract-car_ims-1234/g.jpg",
        "sub/.tmp-h.jpg.abc",
    ]
    for rel in wanted + ignored:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert find_images(tmp_path) == sorted(tmp_path / rel for rel in wanted)
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "missing")


# --- class names ----------------------------------------------------------------------------


def test_real_class_names_files_agree() -> None:
    meta = read_class_names(_shared(LABELS_DIR / "cars_meta.mat"))
    assert len(meta) == 196
    assert meta[1] == "AM General Hummer SUV 2000"
    assert read_class_names(_shared(LABELS_DIR / "names.csv")) == meta  # one name per line
    assert read_class_names(_shared(LABELS_DIR / "class_names.csv")) == meta  # Class,class_name


def test_class_names_fill_only_missing_names(tmp_path: Path) -> None:
    labels = {
        "a.jpg": LabelRecord("a.jpg", 1, None),
        "b.jpg": LabelRecord("b.jpg", 2, "Own"),
        "c.jpg": LabelRecord("c.jpg", 3, None),
    }
    named = with_class_names(labels, {1: "One", 2: "Two"})
    assert [named[k].class_name for k in ("a.jpg", "b.jpg", "c.jpg")] == ["One", "Own", None]


def test_bad_class_names_file(tmp_path: Path) -> None:
    bad = _write(tmp_path / "names.csv", "Class,class_name\nx,Audi\n")
    with pytest.raises(LabelsError, match="row 2"):
        read_class_names(bad)
    with pytest.raises(LabelsError, match="empty"):
        read_class_names(_write(tmp_path / "empty.csv", "\n"))


# --- matching labels to images ----------------------------------------------------------------


def _touch(root: Path, *names: str) -> list[Path]:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    return find_images(root)


def test_same_base_name_in_two_folders_never_mixes(tmp_path: Path) -> None:
    images = _touch(tmp_path, "cars_train/00001.jpg", "cars_test/00001.jpg", "cars_train/2.jpg")
    by_folder = {
        "cars_train/00001.jpg": LabelRecord("cars_train/00001.jpg", 14, None),
        "cars_test/00001.jpg": LabelRecord("cars_test/00001.jpg", 181, None),
    }
    match = match_labels(tmp_path, images, by_folder)
    assert {p.relative_to(tmp_path).as_posix(): r.class_id for p, r in match.labels.items()} == {
        "cars_train/00001.jpg": 14,
        "cars_test/00001.jpg": 181,
    }
    assert match.unmatched == ["cars_train/2.jpg"]
    # A bare name fits both photos: it labels neither rather than one at random.
    bare = {"00001.jpg": LabelRecord("00001.jpg", 14, None), "2.jpg": LabelRecord("2.jpg", 3, None)}
    match = match_labels(tmp_path, images, bare)
    assert {p.name for p in match.labels} == {"2.jpg"}
    assert match.ambiguous == ["00001.jpg"]
    assert match.unmatched == ["cars_test/00001.jpg", "cars_train/00001.jpg"]


def test_key_matches_by_path_suffix_either_way(tmp_path: Path) -> None:
    images = _touch(tmp_path, "car_ims/000001.jpg", "000002.jpg", "x/y/3.jpg")
    labels = {
        "car_ims/000001.jpg": LabelRecord("car_ims/000001.jpg", 1, None),
        "car_ims/000002.jpg": LabelRecord("car_ims/000002.jpg", 2, None),
        "y/3.jpg": LabelRecord("y/3.jpg", 3, None),
        "z/3.jpg": LabelRecord("z/3.jpg", 4, None),
    }
    match = match_labels(tmp_path, images, labels)
    assert sorted(r.class_id for r in match.labels.values()) == [1, 2, 3]
    assert match.unused == ["z/3.jpg"]
    assert match.images == 3


def test_two_keys_with_other_classes_for_one_image_label_it_not(tmp_path: Path) -> None:
    images = _touch(tmp_path, "00001.jpg")
    labels = {
        "cars_train/00001.jpg": LabelRecord("cars_train/00001.jpg", 14, None),
        "cars_test/00001.jpg": LabelRecord("cars_test/00001.jpg", 181, None),
    }
    match = match_labels(tmp_path, images, labels)
    assert match.labels == {}
    assert match.ambiguous == ["cars_test/00001.jpg", "cars_train/00001.jpg"]
