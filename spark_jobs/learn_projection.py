"""spark-submit entry point: Learn the index's projection (LDA from the labels, or whitening) where
the vectors are.

The logic is :mod:`imgsim.jobs.learn_projection` (its docstring has the arguments and outputs).
"""

from imgsim.jobs.learn_projection import main

if __name__ == "__main__":
    raise SystemExit(main())
