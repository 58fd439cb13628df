"""Stanford Cars labels in both layouts, keyed by image file name.

* ``cars_annos.mat`` (official, all-in-one): an ``annotations`` struct array with
  ``relative_im_path`` ('car_ims/000001.jpg'), ``bbox_x1..bbox_y2``, ``class`` (1-based) and
  ``test``, plus ``class_names`` (a 1 x 196 cell). The devkit's ``cars_train_annos.mat``
  (``fname`` instead of ``relative_im_path``, no class names) is read too.
* The Kaggle CSV (``,x1,y1,x2,y2,Class,image``): needs the header with ``Class`` and ``image``;
  an optional ``class_name`` column is used; other columns are ignored.

Keys are the image paths as the labels file stores them ('car_ims/000001.jpg', '00001.jpg',
'cars_test/00001.jpg'), never bare base names: cars_train/00001.jpg and cars_test/00001.jpg are
different photos. :func:`match_labels` gives each image the label whose key ends its path
(component by component); a key that fits several images labels none of them (ambiguous).

Class names come from the labels file, or from a class-names file (:func:`read_class_names`:
``cars_meta.mat``, a ``Class,class_name`` CSV, or one name per line) for labels without one.
scipy is imported only when a .mat file is read or written.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from imgsim.errors import PermanentError
from imgsim.fsutil import TMP_PREFIX, atomic_open

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
MAT_FIELDS = (
    "relative_im_path",
    "bbox_x1",
    "bbox_y1",
    "bbox_x2",
    "bbox_y2",
    "class",
    "test",
)
CSV_REQUIRED = ("Class", "image")
CSV_CLASS_NAME = "class_name"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class LabelsError(ValueError, PermanentError):
    """A labels file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class LabelRecord:
    image: str  # the image path as stored: "car_ims/000001.jpg", "00001.jpg", ...
    class_id: int  # 1..196
    class_name: str | None


def _image_key(value: str) -> str:
    """The stored image path, normalised: forward slashes, no leading '/' or './'."""
    parts = PurePosixPath(value.strip().replace("\\", "/")).parts
    return "/".join(p for p in parts if p not in ("/", ".", ""))


def _add(out: dict[str, LabelRecord], record: LabelRecord, path: Path, where: str) -> None:
    """Add ``record``; the same image twice is fine only with the same class."""
    old = out.get(record.image)
    if old is not None and old.class_id != record.class_id:
        raise LabelsError(
            f"labels file {path}: image {record.image!r} has two classes, "
            f"{old.class_id} and {record.class_id} ({where})"
        )
    if old is None or (old.class_name is None and record.class_name is not None):
        out[record.image] = record


# --- .mat ---------------------------------------------------------------------------------


def _mat_str(value: Any) -> str:
    import numpy as np

    arr = np.asarray(value)
    if arr.size == 0:
        return ""
    return str(arr.ravel()[0])


def _mat_int(value: Any) -> int:
    import numpy as np

    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"expected one number, got {arr.size}")
    number = arr.ravel()[0]
    if float(number) != int(number):
        raise ValueError(f"{number!r} is not an integer")
    return int(number)


def read_cars_annos_mat(path: Path) -> dict[str, LabelRecord]:
    """Labels from the official ``cars_annos.mat`` (or a devkit ``cars_*_annos.mat``)."""
    import numpy as np
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=True)
    except NotImplementedError as exc:  # v7.3 files are HDF5
        raise LabelsError(f"labels file {path}: unsupported MATLAB file ({exc})") from exc
    except Exception as exc:  # scipy raises many types (MatReadError, IndexError...) on junk
        raise LabelsError(f"labels file {path} is not a readable .mat file: {exc}") from exc
    annotations = mat.get("annotations")
    if not isinstance(annotations, np.ndarray) or annotations.dtype.names is None:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise LabelsError(f"labels file {path} has no 'annotations' struct array: found {found}")
    fields = annotations.dtype.names
    path_field = next((f for f in ("relative_im_path", "fname") if f in fields), None)
    missing = [f for f in (path_field or "relative_im_path", "class") if f not in fields]
    if path_field is None or missing:
        raise LabelsError(
            f"labels file {path}: annotations lack field(s) {', '.join(missing)}: "
            f"found {list(fields)}"
            + (" (test annotations without labels?)" if "class" in missing else "")
        )
    names: list[str] | None = None
    raw_names = mat.get("class_names")
    if isinstance(raw_names, np.ndarray) and raw_names.size:
        names = [_mat_str(v) for v in raw_names.ravel()]

    out: dict[str, LabelRecord] = {}
    for i, entry in enumerate(annotations.ravel(), start=1):
        image = _image_key(_mat_str(entry[path_field]))
        if not image:
            raise LabelsError(f"labels file {path}: annotation {i} has an empty {path_field}")
        try:
            class_id = _mat_int(entry["class"])
        except (ValueError, TypeError) as exc:
            raise LabelsError(
                f"labels file {path}: annotation {i} ({image}) has a bad class: {exc}"
            ) from exc
        if class_id < 1 or (names is not None and class_id > len(names)):
            limit = f"1..{len(names)}" if names is not None else ">= 1"
            raise LabelsError(
                f"labels file {path}: annotation {i} ({image}) has class {class_id}, "
                f"outside {limit}"
            )
        name = names[class_id - 1] if names is not None else None
        _add(out, LabelRecord(image, class_id, name), path, f"annotation {i}")
    if not out:
        raise LabelsError(f"labels file {path} has no annotations")
    return out


def _mat_uint(value: int) -> Any:
    """A 1x1 array of the smallest unsigned type, as scipy reads the official file."""
    import numpy as np

    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if value <= np.iinfo(dtype).max:
            return np.array([[value]], dtype=dtype)
    raise ValueError(f"{value} is too large")


def write_cars_annos_mat(
    path: Path, records: Sequence[tuple[Any, ...]], class_names: Sequence[str]
) -> None:
    """Write a ``cars_annos.mat`` with the official structure (for demo data and tests).

    ``records`` are ``(image, class_id)``; an image without a folder is stored as
    ``car_ims/<image>``. A record may carry more values, ``(image, class_id, x1, y1, x2, y2,
    test)``; bbox values and the test flag not given are written as 0.
    """
    import numpy as np
    import scipy.io

    n_classes = len(class_names)
    annotations = np.empty((1, len(records)), dtype=[(f, object) for f in MAT_FIELDS])
    for j, rec in enumerate(records):
        image, class_id, *rest = tuple(rec)
        if len(rest) > 5:
            raise ValueError(f"record {rec!r}: expected (image, class_id[, x1, y1, x2, y2, test])")
        x1, y1, x2, y2, test = [int(v) for v in rest] + [0] * (5 - len(rest))
        if not 1 <= int(class_id) <= n_classes:
            raise ValueError(f"record {rec!r}: class_id must be in 1..{n_classes}")
        if min(x1, y1, x2, y2, test) < 0:
            raise ValueError(f"record {rec!r}: bbox and test must be >= 0")
        rel = image if "/" in image else f"car_ims/{image}"
        annotations[0, j] = (
            np.array([rel]),
            *(_mat_uint(v) for v in (x1, y1, x2, y2, int(class_id), test)),
        )
    names = np.empty((1, n_classes), dtype=object)
    for k, name in enumerate(class_names):
        names[0, k] = np.array([str(name)])
    with atomic_open(path, "wb") as fh:
        scipy.io.savemat(
            fh,
            {"annotations": annotations, "class_names": names},
            format="5",
            do_compression=True,
            oned_as="row",
        )


# --- CSV ----------------------------------------------------------------------------------


def read_labels_csv(path: Path) -> dict[str, LabelRecord]:
    """Labels from a CSV with a header holding ``Class`` and ``image`` (Kaggle layout)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise LabelsError(f"labels file {path} is empty")
            header = [h.strip() for h in header]
            missing = [c for c in CSV_REQUIRED if c not in header]
            if missing:
                hint = ""
                if any(_looks_like_image(h) for h in header):
                    hint = (
                        "; the first line looks like data: a header row naming the columns "
                        "'Class' and 'image' is required"
                    )
                raise LabelsError(
                    f"labels file {path} lacks column(s) {', '.join(missing)}: found {header}{hint}"
                )
            i_class = header.index("Class")
            i_image = header.index("image")
            i_name = header.index(CSV_CLASS_NAME) if CSV_CLASS_NAME in header else None
            out: dict[str, LabelRecord] = {}
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                out_of_row = len(row) <= max(i_class, i_image)
                image = "" if out_of_row else _image_key(row[i_image])
                if not image:
                    raise LabelsError(f"labels file {path}, line {line}: empty image name")
                raw_class = row[i_class].strip()
                class_id = _parse_class(raw_class)
                if class_id is None:
                    raise LabelsError(
                        f"labels file {path}, line {line}: Class {raw_class!r} is not a "
                        "positive integer"
                    )
                name = None
                if i_name is not None and i_name < len(row):
                    name = row[i_name].strip() or None
                _add(out, LabelRecord(image, class_id, name), path, f"line {line}")
    except UnicodeDecodeError as exc:
        raise LabelsError(f"labels file {path} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise LabelsError(f"labels file {path} is not a readable CSV: {exc}") from exc
    return out


def _looks_like_image(cell: str) -> bool:
    return os.path.splitext(cell.strip().lower())[1] in IMAGE_SUFFIXES


def _parse_class(raw: str) -> int | None:
    try:
        value = int(raw)
    except ValueError:
        try:
            number = float(raw)  # "14.0", as written by tools that turned the column to float
        except ValueError:
            return None
        if not number.is_integer():
            return None
        value = int(number)
    return value if value >= 1 else None


# --- dispatch and image listing -----------------------------------------------------------


def _read_head(path: Path, what: str) -> bytes:
    """The first 4 KiB of ``path`` (which layout it is), or a LabelsError naming ``what``."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4096)
    except OSError as exc:
        raise LabelsError(f"{what} {path} cannot be read: {exc}") from exc


def read_labels(path: Path) -> dict[str, LabelRecord]:
    """Read either layout, recognised by content: a MATLAB file or a CSV with a header."""
    path = Path(path)
    head = _read_head(path, "labels file")
    if head.startswith(_HDF5_MAGIC):
        raise LabelsError(
            f"labels file {path} is a MATLAB v7.3 (HDF5) file; save it as v5 (-v7) instead"
        )
    if head.startswith(b"MATLAB"):
        return read_cars_annos_mat(path)
    if b"\x00" in head:
        if path.suffix.lower() == ".mat":  # a v4 .mat has no text header
            return read_cars_annos_mat(path)
        raise LabelsError(f"labels file {path} is neither a MATLAB .mat file nor a CSV")
    return read_labels_csv(path)


def find_images(root: Path) -> list[Path]:
    """All .jpg/.jpeg/.png files under ``root`` (any case), sorted.

    Hidden files and directories are skipped, and so are temporary ones (``.tmp-*``).
    Symlinked directories are not followed. A missing ``root`` raises FileNotFoundError.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory {root} does not exist")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", TMP_PREFIX))]
        base = Path(dirpath)
        for name in filenames:
            if name.startswith((".", TMP_PREFIX)):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(base / name)
    found.sort()
    return found


# --- class names ----------------------------------------------------------------------------

CLASS_ID_COLUMNS = ("Class", "class", "class_id", "id")
CLASS_NAME_COLUMNS = ("class_name", "name", "class_names")


def read_class_names(path: Path) -> dict[int, str]:
    """Class id -> name from ``cars_meta.mat`` (or any .mat with ``class_names``) or a CSV.

    A CSV either has a header naming an id column (``Class``, ``class_id``, ...) and a name
    column (``class_name``, ``name``), or holds one name per line, line i naming class i
    (the Kaggle ``names.csv``).
    """
    path = Path(path)
    head = _read_head(path, "class-names file")
    if head.startswith(b"MATLAB") or (b"\x00" in head and path.suffix.lower() == ".mat"):
        return _read_class_names_mat(path)
    if b"\x00" in head:
        raise LabelsError(f"class-names file {path} is neither a .mat file nor a CSV")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [row for row in csv.reader(fh)]
    except UnicodeDecodeError as exc:
        raise LabelsError(f"class-names file {path} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise LabelsError(f"class-names file {path} is not a readable CSV: {exc}") from exc
    rows = [[c.strip() for c in row] for row in rows if any(c.strip() for c in row)]
    if not rows:
        raise LabelsError(f"class-names file {path} is empty")
    header = rows[0]
    i_id = next((header.index(c) for c in CLASS_ID_COLUMNS if c in header), None)
    i_name = next((header.index(c) for c in CLASS_NAME_COLUMNS if c in header), None)
    if i_id is None or i_name is None:  # one name per line
        return {i: ",".join(row) for i, row in enumerate(rows, start=1)}
    out: dict[int, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        class_id = _parse_class(row[i_id]) if i_id < len(row) else None
        if class_id is None or i_name >= len(row) or not row[i_name]:
            raise LabelsError(
                f"class-names file {path}, row {n}: expected a class id >= 1 and a name, got {row}"
            )
        out[class_id] = row[i_name]
    return out


def _read_class_names_mat(path: Path) -> dict[int, str]:
    import numpy as np
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=True)
    except Exception as exc:  # scipy raises many types on junk
        raise LabelsError(f"class-names file {path} is not a readable .mat file: {exc}") from exc
    raw = mat.get("class_names")
    if not isinstance(raw, np.ndarray) or not raw.size:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise LabelsError(f"class-names file {path} has no 'class_names': found {found}")
    return {i: _mat_str(v) for i, v in enumerate(raw.ravel(), start=1)}


def with_class_names(
    labels: Mapping[str, LabelRecord], names: Mapping[int, str]
) -> dict[str, LabelRecord]:
    """``labels`` with names from ``names`` where the labels file gave none."""
    return {
        key: rec
        if rec.class_name is not None or rec.class_id not in names
        else replace(rec, class_name=names[rec.class_id])
        for key, rec in labels.items()
    }


# --- matching labels to images ------------------------------------------------------------


@dataclass
class LabelMatch:
    """Which images of a folder the labels name (see :func:`match_labels`)."""

    labels: dict[Path, LabelRecord] = field(default_factory=dict)  # image path -> label
    images: int = 0
    unmatched: list[str] = field(default_factory=list)  # image paths (relative), sorted
    unused: list[str] = field(default_factory=list)  # label keys that matched no image
    ambiguous: list[str] = field(default_factory=list)  # keys that fit several images


def _parts(key: str) -> tuple[str, ...]:
    return tuple(p for p in key.split("/") if p)


def match_labels(
    root: Path, images: Iterable[Path], labels: Mapping[str, LabelRecord]
) -> LabelMatch:
    """Match each image under ``root`` to the label whose key ends its path, or vice versa.

    Key ``cars_train/00001.jpg`` fits ``<root>/cars_train/00001.jpg`` and
    ``<root>/x/cars_train/00001.jpg``, never ``<root>/cars_test/00001.jpg``; key ``00001.jpg``
    fits any image named ``00001.jpg``, so when two such images exist it labels neither. When
    several keys fit one image (``car_ims/1.jpg`` and ``1.jpg``), the longest wins; keys as
    long with other classes (``a/1.jpg``, ``b/1.jpg`` for an image ``1.jpg``) label it not.
    """
    root = Path(root)
    by_name: dict[str, list[tuple[tuple[str, ...], LabelRecord]]] = {}
    for key, rec in labels.items():
        parts = _parts(key)
        if parts:
            by_name.setdefault(parts[-1], []).append((parts, rec))
    result = LabelMatch()
    chosen: dict[Path, tuple[str, ...]] = {}
    users: dict[tuple[str, ...], list[Path]] = {}
    clashes: set[tuple[str, ...]] = set()
    unmatched: list[str] = []
    for image in images:
        result.images += 1
        rel = image.relative_to(root).parts
        fits = [
            (parts, rec)
            for parts, rec in by_name.get(rel[-1], ())
            if rel[-len(parts) :] == parts or parts[-len(rel) :] == rel
        ]
        if not fits:
            unmatched.append("/".join(rel))
            continue
        best = max(len(parts) for parts, _ in fits)
        top = [(p, rec) for p, rec in fits if len(p) == best]
        if len({rec.class_id for _, rec in top}) > 1:  # keys as long, other classes
            unmatched.append("/".join(rel))
            clashes.update(p for p, _ in top)
            continue
        chosen[image] = top[0][0]
        users.setdefault(top[0][0], []).append(image)
    records = {_parts(k): rec for k, rec in labels.items()}
    for image, parts in chosen.items():
        if len(users[parts]) == 1:
            result.labels[image] = records[parts]
        else:
            unmatched.append(image.relative_to(root).as_posix())
    result.ambiguous = sorted(
        {"/".join(p) for p, imgs in users.items() if len(imgs) > 1} | {"/".join(p) for p in clashes}
    )
    used = set(users)
    result.unused = sorted(k for k in labels if _parts(k) not in used)
    result.unmatched = sorted(unmatched)
    return result


__all__ = [
    "LabelMatch",
    "LabelRecord",
    "LabelsError",
    "find_images",
    "match_labels",
    "read_cars_annos_mat",
    "read_class_names",
    "read_labels",
    "read_labels_csv",
    "with_class_names",
    "write_cars_annos_mat",
]
