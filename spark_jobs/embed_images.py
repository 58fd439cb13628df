"""spark-submit entry point: Embed one index run's images on Spark executors; writes the same store
as the embed tasks.

The logic is :mod:`imgsim.jobs.embed_images` (its docstring has the arguments and outputs).
"""

from imgsim.jobs.embed_images import main

if __name__ == "__main__":
    raise SystemExit(main())
