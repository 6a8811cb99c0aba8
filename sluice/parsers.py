"""JSON request parsers that refuse, at the door, what would otherwise fail deep inside.

Python's json module accepts three things that break later, each a 500 before these
parsers: nesting so deep that parsing itself overflows the stack (RecursionError);
unpaired surrogates written as escapes ("\\ud800"), which are not Unicode characters and
so cannot be encoded again, whether to count tokens, to log or to echo in an error; and,
for anything bound for PostgreSQL, NUL characters, which its text and JSONB types refuse.
"""

from __future__ import annotations

import math
from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

# Far deeper than any real request (an OpenAI chat body is about five levels deep), far
# shallower than the interpreter's recursion limit.
MAX_DEPTH = 64


def problem_in(data: Any, *, allow_nul: bool) -> str | None:
    """What makes parsed JSON unusable, with where it is, or None."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"it is nested more than {MAX_DEPTH} levels deep"
        if isinstance(value, str):
            trouble = _text_trouble(value, allow_nul=allow_nul)
            if trouble:
                return f"{where or 'the body'} {trouble}"
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{where or 'the body'} is {value}, which JSON has no number for"
        elif isinstance(value, dict):
            for name, item in value.items():
                trouble = _text_trouble(name, allow_nul=allow_nul)
                if trouble:
                    return f"a field name in {where or 'the body'} {trouble}"
                stack.append((item, f"{where}.{name}" if where else name, depth + 1))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                stack.append((item, f"{where}[{index}]", depth + 1))
    return None


def _text_trouble(text: str, *, allow_nul: bool) -> str | None:
    if not allow_nul and "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(text[exc.start])
            return f"contains an unpaired surrogate (\\u{code:04x}), which is not a character"
    return None


class SluiceJSONParser(JSONParser):
    """DRF's JSON parser, refusing bodies nested too deeply or holding unpaired surrogates."""

    allow_nul = True

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(
                f"JSON parse error - nested more than {MAX_DEPTH} levels deep"
            ) from None
        problem = problem_in(data, allow_nul=self.allow_nul)
        if problem:
            raise ParseError(f"JSON parse error - {problem}")
        return data


class StorableJSONParser(SluiceJSONParser):
    """For the management API, whose text ends in PostgreSQL: NUL characters are refused too."""

    allow_nul = False
