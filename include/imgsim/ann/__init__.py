"""The search core: one implementation of imgsim's approximate nearest-neighbour search.

Arrows point down only: ``tuning`` -> ``search`` -> ``bands`` -> ``brp``.

* :mod:`~imgsim.ann.brp`: Spark's BucketedRandomProjectionLSH in NumPy (the saved model, its
  hashes, band keys and multi-probe keys);
* :mod:`~imgsim.ann.bands`: band keys packed and sorted, batched candidate masks;
* :mod:`~imgsim.ann.search`: distances, tie-stable top-k, :class:`LshIndex` (batched lookups
  through the ladder lsh -> widened -> exact, or a scan where that is cheaper), recall;
* :mod:`~imgsim.ann.tuning`: the auto-tuner (recall@k against the share compared).

The in-process lookup (:mod:`imgsim.query.lookup`), the fit job's evaluation, the Spark query job's
UDFs and the tuner all call these; NumPy only (no Spark, no torch).
"""

from imgsim.ann.bands import BandIndex
from imgsim.ann.brp import (
    AnnError,
    BrpParams,
    hash_vectors,
    l2_normalize,
    load_brp_model,
    probe_keys,
    probe_keys_of,
    projections,
    random_unit_vectors,
)
from imgsim.ann.search import (
    METHODS,
    SCAN_BELOW,
    SCAN_SHARE,
    LshIndex,
    Neighbours,
    RecallReport,
    exact_search,
    expand_queries,
    leave_one_out_recall,
    refine,
    scan_is_cheaper,
    smallest_k,
    squared_distances,
    top_k,
)

__all__ = [
    "METHODS",
    "SCAN_BELOW",
    "SCAN_SHARE",
    "AnnError",
    "BandIndex",
    "BrpParams",
    "LshIndex",
    "Neighbours",
    "RecallReport",
    "exact_search",
    "expand_queries",
    "hash_vectors",
    "l2_normalize",
    "leave_one_out_recall",
    "load_brp_model",
    "probe_keys",
    "probe_keys_of",
    "projections",
    "random_unit_vectors",
    "refine",
    "scan_is_cheaper",
    "smallest_k",
    "squared_distances",
    "top_k",
]
