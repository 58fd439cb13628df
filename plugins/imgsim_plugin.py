"""Airflow plugin: the imgsim pages in the Airflow UI (versions, queries, upload, duplicates, map).

Wiring only. The FastAPI app lives in ``imgsim.serve.webui`` and is mounted under ``/imgsim`` of the
API server; the menu entries open its pages inside the Airflow UI. Every page needs an Airflow
login. Nothing heavy is imported here (no torch, PIL or pyspark): the plugin is loaded by every
Airflow process, task runners included.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from imgsim.serve.webui import app

# ``href`` is relative (no leading slash) so it resolves against the UI's <base href>, which
# keeps the links right when Airflow is served under a path prefix.
_VIEWS: list[dict[str, Any]] = [
    {
        "name": "Image similarity",
        "href": "imgsim/",
        "url_route": "imgsim",
        "destination": "nav",
        "nav_top_level": True,
    },
    {
        "name": "imgsim: latest queries",
        "href": "imgsim/gallery",
        "url_route": "imgsim-gallery",
        "destination": "nav",
        "category": "Image similarity",
    },
    {
        "name": "imgsim: find similar images",
        "href": "imgsim/search",
        "url_route": "imgsim-search",
        "destination": "nav",
        "category": "Image similarity",
    },
    {
        "name": "imgsim: duplicate groups",
        "href": "imgsim/duplicates",
        "url_route": "imgsim-duplicates",
        "destination": "nav",
        "category": "Image similarity",
    },
    {
        "name": "imgsim: map of the index",
        "href": "imgsim/map",
        "url_route": "imgsim-map",
        "destination": "nav",
        "category": "Image similarity",
    },
]


class ImgsimPlugin(AirflowPlugin):
    name = "imgsim"
    # AirflowPlugin declares these as mutable lists (it removes invalid entries in place).
    fastapi_apps = [{"app": app, "url_prefix": "/imgsim", "name": "imgsim"}]  # noqa: RUF012
    external_views = _VIEWS
