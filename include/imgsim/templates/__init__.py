"""imgsim's HTML: the Jinja2 templates in this folder and the one environment rendering them.

``base.html`` is the page layout with the one stylesheet; ``macros.html`` holds the parts the
pages share: a query beside its neighbours, an error box. ``run.html`` shows one run's query
results, both as the run's self-contained gallery.html (:mod:`imgsim.query.results`; ``ui``
None: no links, images inlined as data URIs) and as the UI's gallery page
(:mod:`imgsim.serve.webui`, with its nav); the UI's other pages are ``versions.html``,
``search.html`` and ``error.html``.

Every value is escaped (autoescape), None renders as nothing, and a name a template uses but
is not given fails (StrictUndefined).
"""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined


def number(value: Any, spec: str, missing: str = "–") -> str:
    """``value`` formatted with ``spec`` (".4f", ".0%" ...), or ``missing`` if it is no number."""
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return missing


ENV = Environment(
    loader=PackageLoader("imgsim"),
    autoescape=True,
    undefined=StrictUndefined,
    finalize=lambda value: "" if value is None else value,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters["number"] = number


def render(template: str, **context: Any) -> str:
    """The page ``template`` (a file name in this folder) with ``context``."""
    return ENV.get_template(template).render(context)
