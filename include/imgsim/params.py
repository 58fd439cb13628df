"""DAG Params that default to a setting: the setting's one declaration (:class:`imgsim.config.
Settings`) gives the Param its default, JSON-schema type, limits, choices, title and
description, so the trigger form and the environment accept the same values."""

from __future__ import annotations

from functools import cache
from typing import Any

from imgsim.config import CHOICES, Settings

#: the JSON-schema keys a setting passes on to its Param
_SCHEMA_KEYS = ("type", "minimum", "maximum", "title", "description")


@cache
def _properties() -> dict[str, dict[str, Any]]:
    return dict(Settings.model_json_schema()["properties"])


def setting_schema(name: str) -> dict[str, Any]:
    """Setting ``name``'s JSON schema, as far as a Param uses it."""
    prop = _properties()[name]
    schema = {key: prop[key] for key in _SCHEMA_KEYS if key in prop}
    if name in CHOICES:
        schema["enum"] = list(CHOICES[name][0])
    return schema


def setting_param(settings: Settings, name: str, **schema: Any) -> Any:
    """A Param defaulting to ``settings``'s value of ``name``, with the setting's schema;
    ``schema`` adds to it or replaces parts (a list of locations for a whitespace-separated
    setting, a nullable type for an optional one)."""
    from airflow.sdk import Param

    default = schema.pop("default", getattr(settings, name))
    return Param(default, **{**setting_schema(name), **schema})
