"""Airflow Assets, defined once: the index DAG produces them, the query DAG consumes them."""

from __future__ import annotations

from airflow.sdk import Asset

#: A new model version was published; the event's ``extra`` carries ``{"version": ...}``.
LSH_MODEL = Asset(name="imgsim_lsh_model", uri="imgsim://models/lsh/CURRENT", group="imgsim")
