"""Route templates (docs/routes.md): ``message``, ``sessionKey`` and ``when`` in Jinja2's sandbox.

Templates are compiled once, when the config loads; a syntax error is a config error
(:class:`TemplateSyntaxError` carries a message without the payload). At request
time they see ``body`` (the parsed JSON, or the form fields), ``headers`` (lower-cased
names) and ``route``. The environment is Jinja2's *immutable* sandbox: no attribute
access beyond data, no ``__class__`` walks, no mutation of the payload, no imports, no
file access. An absent field renders empty, and so does JSON ``null``; chained
look-ups under an absent field (``body.a.b.c``) stay empty instead of failing.
"""

from __future__ import annotations

from typing import Any

from jinja2 import ChainableUndefined, TemplateError
from jinja2 import TemplateSyntaxError as _JinjaSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateSyntaxError(ValueError):
    """A template does not compile; the message says where (line) and what."""


class RenderError(Exception):
    """A template failed while rendering (a filter on the wrong type, a sandbox refusal).
    The message names the error's type only: its text may quote the payload."""


def _finalize(value: object) -> object:
    return "" if value is None else value  # JSON null renders empty, not "None"


_ENV = ImmutableSandboxedEnvironment(
    undefined=ChainableUndefined,
    finalize=_finalize,
    autoescape=False,  # the output is a message for an agent, not HTML
    keep_trailing_newline=False,
)


class Template:
    """A compiled ``message`` or ``sessionKey`` template."""

    __slots__ = ("_template", "name", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        try:
            self._template = _ENV.from_string(source)
        except _JinjaSyntaxError as exc:
            raise TemplateSyntaxError(
                f"template syntax error on line {exc.lineno}: {exc.message}"
            ) from None

    def render(self, context: dict[str, Any]) -> str:
        try:
            return self._template.render(context)
        except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as exc:
            raise RenderError(f"{self.name} template failed ({type(exc).__name__})") from None

    def __repr__(self) -> str:
        return f"Template({self.name!r}, {self.source!r})"


class Expression:
    """A compiled ``when`` expression: true forwards the delivery, false ignores it.

    Written as a bare Jinja2 expression (``body.action == 'opened'``); one wrapped in
    ``{{ }}`` is accepted too, as that is how the other templates are written."""

    __slots__ = ("_expression", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        text = source.strip()
        if text.startswith("{{") and text.endswith("}}"):
            text = text[2:-2]
        try:
            self._expression = _ENV.compile_expression(text, undefined_to_none=False)
        except _JinjaSyntaxError as exc:
            raise TemplateSyntaxError(f"expression syntax error: {exc.message}") from None

    def __call__(self, context: dict[str, Any]) -> bool:
        try:
            return bool(self._expression(**context))
        except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as exc:
            raise RenderError(f"when expression failed ({type(exc).__name__})") from None

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"
