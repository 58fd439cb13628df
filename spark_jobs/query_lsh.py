"""spark-submit entry point: Answer a batch of queries with a published LSH model version, in one
Spark job.

The logic is :mod:`imgsim.jobs.query_lsh` (its docstring has the arguments and outputs).
"""

from imgsim.jobs.query_lsh import main

if __name__ == "__main__":
    raise SystemExit(main())
