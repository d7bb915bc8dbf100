"""The report's HTML: one jinja2 environment over ``templates/`` with autoescape on, and the
fragments of ``components.html.j2`` as Python callables (``ui().figure(...)`` returns Markup).

Every value reaches the pages through a template, so it is escaped unless it is a fragment a
template already rendered (:class:`markupsafe.Markup`); Python code never writes markup itself.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Iterable, Sequence

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

TEMPLATE_PACKAGE = "mono4d.pipeline.report"


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The report's jinja2 environment: templates of this package, HTML autoescape for
    ``*.html.j2``, undefined names are errors, ``tojson`` compact."""
    env = Environment(loader=PackageLoader(TEMPLATE_PACKAGE, "templates"),
                      autoescape=select_autoescape(enabled_extensions=("html", "j2"), default_for_string=True,
                                                   default=True),
                      undefined=StrictUndefined, keep_trailing_newline=True)
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":"), "sort_keys": False}
    env.globals["ui"] = env.get_template("components.html.j2").module
    return env


def ui() -> Any:
    """The macros of ``components.html.j2`` (attributes; each call returns Markup)."""
    return environment().globals["ui"]


def render(template: str, **context: Any) -> str:
    """Render the page template ``template`` with ``context``."""
    return environment().get_template(template).render(**context)


def join(parts: Iterable[Any]) -> Markup:
    """Concatenate fragments; plain strings among them are escaped."""
    return Markup("").join(parts)


def format_value(value: Any) -> str:
    """A parameter, figure or fact as short text: floats to 6 significant digits, None as a
    dash, containers as JSON cut at 300 characters."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if value == "":
        return '""'
    if isinstance(value, (int, str)):
        return str(value)
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 300 else text[:297] + "..."


def facts_table(rows: Sequence[tuple[str, Any]]) -> Markup:
    """A two-column table of ``(name, value)`` rows, values through :func:`format_value`."""
    return ui().facts_table([(key, format_value(value)) for key, value in rows])


def grid(cells: Sequence[Any], columns: int) -> Markup:
    return ui().grid(list(cells), max(1, columns))


def strip(cells: Sequence[Any]) -> Markup:
    return ui().strip(list(cells))
