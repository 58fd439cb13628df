"""spark-submit entry point: Fit BucketedRandomProjectionLSH on all live embeddings and write a new
model version.

The logic is :mod:`imgsim.jobs.fit_lsh` (its docstring has the arguments and outputs).
"""

from imgsim.jobs.fit_lsh import main

if __name__ == "__main__":
    raise SystemExit(main())
