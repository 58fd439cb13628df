"""Is it the same photo? Local features verify near-duplicate candidates.

Close embeddings say "the same kind of car from the same angle", not "the same photo": on the
8,144-photo Stanford Cars training set most pairs under the embedding distance are other shots
of one model (and some pair two models). Pinterest's NearDup verifies its LSH candidates with a
classifier; here each candidate pair is verified geometrically, as copy detection does: ORB
keypoints of both 224x224 thumbnails (the ones the index stored), matched with Lowe's ratio
test, and a RANSAC similarity transform (rotation, scale, shift) fitted to the matches. A copy
(re-encoded, resized, cropped, lightly rotated) keeps hundreds of matches on one transform;
two photos of one model keep a few dozen at most. The mirrored thumbnail is tried too, so a
flipped copy is a copy. The pair is the same photo when the inliers reach ``min_inliers``
(:data:`MIN_INLIERS`, measured by ``benchmarks/bench_duplicates.py``).

OpenCV (``opencv-python-headless``) is imported on first use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Inliers of the RANSAC transform from which a pair is one photo. Measured on the 8,144-photo
#: training set with planted copies (benchmarks/bench_duplicates.py --set train): see
#: benchmarks/README.md for the copies' and the distinct pairs' inlier counts.
MIN_INLIERS = 90
#: ORB settings for 224x224 thumbnails (small patches: a thumbnail has few large corners).
ORB_FEATURES = 500
RATIO = 0.8  # Lowe's ratio test
RANSAC_PIXELS = 4.0
#: Per-image features kept in memory (an image is in several candidate pairs).
CACHE_IMAGES = 4096


@dataclass(frozen=True)
class CopyScore:
    inliers: int  # matches on the best transform (0: not enough features or matches)
    mirrored: bool  # the best transform maps onto the mirrored image

    def same(self, min_inliers: int = MIN_INLIERS) -> bool:
        return self.inliers >= min_inliers


class Unreadable(ValueError):
    """A thumbnail that cannot be read: the pair cannot be verified."""


class CopyVerifier:
    """Scores pairs of images (by path); features are cached per image."""

    def __init__(self, min_inliers: int = MIN_INLIERS) -> None:
        import cv2

        self.min_inliers = min_inliers
        self._cv2 = cv2
        self._orb = cv2.ORB_create(  # type: ignore[attr-defined]
            nfeatures=ORB_FEATURES, fastThreshold=10, edgeThreshold=15, patchSize=15
        )
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self._cache: OrderedDict[str, tuple[Any, Any]] = OrderedDict()

    def _features(self, path: Path) -> tuple[Any, Any]:
        """(as is, mirrored): each (keypoints, descriptors)."""
        key = str(path)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        gray = self._cv2.imread(key, self._cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise Unreadable(f"{path} cannot be read as an image")
        both = (
            self._orb.detectAndCompute(gray, None),
            self._orb.detectAndCompute(self._cv2.flip(gray, 1), None),
        )
        self._cache[key] = both
        if len(self._cache) > CACHE_IMAGES:
            self._cache.popitem(last=False)
        return both

    def _inliers(self, a: tuple[Any, Any], b: tuple[Any, Any]) -> int:
        import numpy as np

        (kpa, da), (kpb, db) = a, b
        if da is None or db is None or len(kpa) < 8 or len(kpb) < 8:
            return 0
        good = [
            m[0]
            for m in self._matcher.knnMatch(da, db, k=2)
            if len(m) == 2 and m[0].distance < RATIO * m[1].distance
        ]
        if len(good) < 8:
            return 0
        src = np.array([kpa[g.queryIdx].pt for g in good], np.float32)
        dst = np.array([kpb[g.trainIdx].pt for g in good], np.float32)
        _, mask = self._cv2.estimateAffinePartial2D(
            src, dst, method=self._cv2.RANSAC, ransacReprojThreshold=RANSAC_PIXELS
        )
        return 0 if mask is None else int(mask.sum())

    def score(self, a: Path, b: Path) -> CopyScore:
        (fa, _), (fb, fb_mirrored) = self._features(a), self._features(b)
        straight, mirrored = self._inliers(fa, fb), self._inliers(fa, fb_mirrored)
        return CopyScore(max(straight, mirrored), mirrored > straight)

    def same(self, a: Path, b: Path) -> bool:
        return self.score(a, b).same(self.min_inliers)


def verify_pairs(
    pairs: Iterable[tuple[str, str]],
    path_of: Callable[[str], Path],
    min_inliers: int = MIN_INLIERS,
) -> list[CopyScore | None]:
    """A score per pair of image ids (None: a thumbnail is missing or unreadable)."""
    verifier = CopyVerifier(min_inliers)
    out: list[CopyScore | None] = []
    for a, b in pairs:
        try:
            out.append(verifier.score(path_of(a), path_of(b)))
        except Unreadable:
            out.append(None)
    return out
