"""Airflow Assets, defined once. The index DAG's publish task emits :data:`LSH_MODEL` with each
new version (it shows in the UI's asset graph and lets other DAGs schedule on a new model); the
query DAG runs on its own timetable and reads ``CURRENT`` when it runs, so it consumes nothing."""

from __future__ import annotations

from airflow.sdk import Asset

#: A new model version was published; the event's ``extra`` carries ``{"version": ...}``.
LSH_MODEL = Asset(name="imgsim_lsh_model", uri="imgsim://models/lsh/CURRENT", group="imgsim")

#: A trained embedder was published (imgsim_train); ``extra`` carries ``{"version": ...}``. The
#: index DAG reads the CURRENT embedder in its catalog task (its next daily run re-embeds with it).
EMBEDDER = Asset(name="imgsim_embedder", uri="imgsim://models/embedder/CURRENT", group="imgsim")
