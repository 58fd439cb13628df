"""Spark's BucketedRandomProjectionLSH in NumPy: its saved model, its hashes, band keys, probes.

Spark's hash for table i is ``floor(r_i . x / bucketLength)``, where the rows r_i of the model's
random matrix are stored in the saved model (``data/*.parquet``). Reading that matrix reproduces
Spark's hashes exactly, so lookups and validation need no JVM.

AND-amplified keys and multi-probe work over the same projections: a model with
``bands * keys_per_band`` projections forms ``bands`` bands of ``keys_per_band`` consecutive
hash values; a reference is a candidate when one of its band keys equals one of the query's
probe keys for that band (its own key, plus ``probes`` keys that move the projections nearest a
bucket boundary into the neighbouring bucket; see :func:`probe_keys_of`). ``keys_per_band=1,
probes=0`` is exactly Spark's OR search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.errors import PermanentError


class AnnError(ValueError, PermanentError):
    """Bad input to the search core (the message says which)."""


@dataclass(frozen=True)
class BrpParams:
    matrix: np.ndarray  # (numHashTables, dim), float64
    bucket_length: float

    @property
    def num_hash_tables(self) -> int:
        return int(self.matrix.shape[0])


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def random_unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """(count, dim) Gaussian directions scaled to unit length, as Spark's BRP draws them."""
    r = np.random.default_rng(seed).normal(size=(count, dim))
    return r / np.linalg.norm(r, axis=1, keepdims=True)


def _matrix_from_udt(m: dict[str, Any]) -> np.ndarray:
    """Spark MatrixUDT struct (type 1 dense, 0 sparse) -> dense ndarray."""
    rows, cols = int(m["numRows"]), int(m["numCols"])
    values = np.asarray(m["values"], dtype=np.float64)
    transposed = bool(m.get("isTransposed"))
    if int(m["type"]) == 1:
        if transposed:  # row-major values
            return values.reshape((rows, cols), order="C")
        return values.reshape((rows, cols), order="F")
    dense = np.zeros((rows, cols))
    col_ptrs, row_idx = m["colPtrs"], m["rowIndices"]
    major = rows if transposed else cols
    for j in range(major):
        for p in range(col_ptrs[j], col_ptrs[j + 1]):
            if transposed:
                dense[j, row_idx[p]] = values[p]
            else:
                dense[row_idx[p], j] = values[p]
    return dense


def load_brp_model(model_dir: str | Path) -> BrpParams:
    """Read the random matrix and bucketLength of a saved BucketedRandomProjectionLSHModel."""
    import pyarrow.parquet as pq

    model_dir = Path(model_dir)
    meta_files = sorted((model_dir / "metadata").glob("part-*"))
    if not meta_files:
        raise FileNotFoundError(f"{model_dir}/metadata: no Spark model metadata")
    meta = json.loads(meta_files[0].read_text().splitlines()[0])
    params = {**meta.get("defaultParamMap", {}), **meta.get("paramMap", {})}
    bucket_length = float(params["bucketLength"])
    data_files = sorted(p for p in (model_dir / "data").glob("*.parquet"))
    if not data_files:
        raise FileNotFoundError(f"{model_dir}/data: no model data")
    rows = pq.read_table(data_files[0]).to_pylist()
    # Spark 4 saves the unit projection vectors as "randUnitVectors" (3.x: "randMatrix").
    key = next((k for k in ("randUnitVectors", "randMatrix") if rows and k in rows[0]), None)
    if len(rows) != 1 or key is None:
        raise ValueError(
            f"{model_dir}/data: expected one row with the random matrix, "
            f"found columns {list(rows[0]) if rows else []}"
        )
    return BrpParams(_matrix_from_udt(rows[0][key]), bucket_length)


def projections(params: BrpParams, x: np.ndarray) -> np.ndarray:
    """(n, dim) -> (n, numHashTables) ``r_i . x / bucketLength`` (float64); floor = the hash."""
    x64 = np.asarray(x, dtype=np.float64)
    return x64 @ params.matrix.T / params.bucket_length


def hash_vectors(params: BrpParams, x: np.ndarray) -> np.ndarray:
    """(n, dim) -> (n, numHashTables) int64 bucket ids, exactly as Spark computes them."""
    return np.floor(projections(params, x)).astype(np.int64)


def probe_keys_of(proj: np.ndarray, keys_per_band: int, probes: int) -> np.ndarray:
    """Bucket keys a query looks up: (m, bands, 1 + probes, keys_per_band) int64.

    ``proj`` are ``x . r / w`` for the model's projections, ``(m, bands * keys_per_band)``.
    Probe 0 is the query's own bucket; probe p moves the band's p-th key nearest a bucket
    boundary (smallest distance to it, ties by position) into the neighbouring bucket on that
    side.
    """
    m, total = proj.shape
    if keys_per_band < 1 or total % keys_per_band:
        raise AnnError(f"{total} projections cannot form bands of {keys_per_band} keys")
    if not 0 <= probes <= keys_per_band:
        raise AnnError(
            f"probes must be between 0 and keys_per_band ({keys_per_band}), got {probes}"
        )
    bands = total // keys_per_band
    base = np.floor(proj).astype(np.int64)
    frac = proj - base
    near = np.minimum(frac, 1.0 - frac).reshape(m, bands, keys_per_band)
    step = np.where(frac < 0.5, -1, 1).reshape(m, bands, keys_per_band)
    own = base.reshape(m, bands, keys_per_band)
    keys = np.repeat(own[:, :, None, :], 1 + probes, axis=2)
    if probes:
        order = np.argsort(near, axis=2, kind="stable")[:, :, :probes]  # (m, bands, p)
        for p in range(probes):
            pos = order[:, :, p]
            delta = np.take_along_axis(step, pos[:, :, None], 2)[:, :, 0]
            view = keys[:, :, 1 + p, :]
            np.put_along_axis(
                view,
                pos[:, :, None],
                np.take_along_axis(view, pos[:, :, None], 2) + delta[:, :, None],
                2,
            )
    return keys


def probe_keys(
    params: BrpParams, x: np.ndarray, keys_per_band: int = 1, probes: int = 0
) -> np.ndarray:
    """:func:`probe_keys_of` for (m, dim) vectors under a model's projections."""
    return probe_keys_of(projections(params, np.atleast_2d(x)), keys_per_band, probes)
