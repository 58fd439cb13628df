"""The Spark applications' logic; ``spark_jobs/*.py`` are their thin spark-submit entry points.

* :mod:`~imgsim.jobs.embed_images`: embed shards of images on the executors;
* :mod:`~imgsim.jobs.learn_projection`: the projection's statistics where the vectors are;
* :mod:`~imgsim.jobs.fit_lsh`: fit BucketedRandomProjectionLSH, hash, evaluate, stage a version;
* :mod:`~imgsim.jobs.query_lsh`: answer a batch of queries with a published version.

Each module has ``parse_args`` and ``main``; tests import them (``from imgsim.jobs import
fit_lsh``). These modules import pyspark at the top: DAG files never import them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def run_application(app_name: str, body: Callable[[Any], Any]) -> int:
    """Start a SparkSession named ``app_name``, run ``body(spark)``, always stop the session."""
    from pyspark.sql import SparkSession

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    spark = SparkSession.builder.appName(app_name).getOrCreate()
    try:
        body(spark)
    finally:
        spark.stop()
    return 0
