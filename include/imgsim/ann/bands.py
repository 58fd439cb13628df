"""Band keys packed into integers and sorted: which references share a band key with a query.

Every band of ``keys_per_band`` hash values is packed into one exact integer (mixed radix over
the band's key ranges) and the references are sorted by it, so the references holding a probe
key are one binary search away: no comparison against every reference. Bands whose key range
does not fit 62 bits fall back to comparing the key columns. Queries come in batches; the
answer is an (m, n) candidate mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgsim.ann.brp import AnnError


@dataclass(frozen=True)
class _Band:
    lo: np.ndarray  # (K,) smallest reference hash per key
    span: np.ndarray  # (K,) hash range per key
    radix: np.ndarray  # (K,) mixed-radix weights; packed id = ((h - lo) * radix).sum()
    order: np.ndarray  # reference rows sorted by packed id
    ids: np.ndarray  # packed ids, sorted


@dataclass(frozen=True)
class BandIndex:
    """The reference hash columns, ``keys_per_band`` at a time, packed and sorted per band."""

    keys_per_band: int
    hashes: np.ndarray  # (n, bands * keys_per_band) int64, Spark's order
    bands: tuple[_Band | None, ...]

    @property
    def size(self) -> int:
        return int(self.hashes.shape[0])

    @classmethod
    def build(cls, ref_hashes: np.ndarray, keys_per_band: int) -> BandIndex:
        ref_hashes = np.asarray(ref_hashes, np.int64)
        n, total = ref_hashes.shape
        if keys_per_band < 1 or total % keys_per_band:
            raise AnnError(f"{total} hash columns cannot form bands of {keys_per_band} keys")
        out: list[_Band | None] = []
        for b in range(total // keys_per_band):
            band = ref_hashes[:, b * keys_per_band : (b + 1) * keys_per_band]
            if n == 0:
                out.append(None)
                continue
            lo, hi = band.min(axis=0), band.max(axis=0)
            span = hi - lo + 1
            if float(np.prod(span.astype(np.float64))) >= 2.0**62:
                out.append(None)
                continue
            radix = np.concatenate([[1], np.cumprod(span[:-1])]).astype(np.int64)
            packed = ((band - lo) * radix).sum(axis=1)
            order = np.argsort(packed, kind="stable")
            out.append(_Band(lo, span, radix, order, packed[order]))
        return cls(keys_per_band, ref_hashes, tuple(out))

    def _check(self, query_keys: np.ndarray) -> None:
        if (
            query_keys.ndim != 4
            or query_keys.shape[1] != len(self.bands)
            or query_keys.shape[3] != self.keys_per_band
        ):
            raise AnnError(
                f"query keys {query_keys.shape} do not fit {len(self.bands)} bands "
                f"of {self.keys_per_band} keys"
            )

    def band_mask(self, b: int, keys: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(m, n) bool: the reference's key in band ``b`` is one of the query's (m, P, K) keys.

        With ``out``, the hits are OR-ed into it (and it is returned).
        """
        m, p, kb = keys.shape
        mask = np.zeros((m, self.size), bool) if out is None else out
        band = self.bands[b]
        if band is None:  # too wide to pack: compare columns
            cols = self.hashes[:, b * kb : (b + 1) * kb]
            for qi in range(m):
                for key in keys[qi]:
                    mask[qi] |= (cols == key).all(axis=1)
            return mask
        rel = keys - band.lo  # (m, P, K)
        inside = ((rel >= 0) & (rel < band.span)).all(axis=2)  # (m, P)
        ids = np.where(inside, (rel * band.radix).sum(axis=2), -1)
        left = np.searchsorted(band.ids, ids, side="left")
        right = np.where(inside, np.searchsorted(band.ids, ids, side="right"), left)
        lengths = (right - left).ravel()
        total = int(lengths.sum())
        if total:
            rows = np.repeat(np.repeat(np.arange(m), p), lengths)
            # positions left..right-1 of every (query, probe), concatenated
            starts = np.repeat(
                left.ravel() - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths
            )
            mask[rows, band.order[starts + np.arange(total)]] = True
        return mask

    def candidates(self, query_keys: np.ndarray) -> np.ndarray:
        """(m, n) bool: the reference shares a band key with one of the query's probe keys.

        ``query_keys`` is (m, bands, probes + 1, keys_per_band), as
        :func:`imgsim.ann.brp.probe_keys_of` gives them.
        """
        query_keys = np.asarray(query_keys, np.int64)
        self._check(query_keys)
        mask = np.zeros((query_keys.shape[0], self.size), bool)
        for b in range(len(self.bands)):
            self.band_mask(b, query_keys[:, b], out=mask)
        return mask
