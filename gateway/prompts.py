"""Prompt-API versions: checking their definitions and rendering their templates.

Pure functions with no database access, shared by the services (which refuse a bad
definition before it is stored), the admin forms and the data plane (which renders).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema
import regex
from jsonschema.exceptions import SchemaError, ValidationError
from referencing.exceptions import Unresolvable

from sluice import errors
from sluice.parsers import problem_in

from .models import TEMPLATE_VARIABLE

ROLES = ("system", "user", "assistant")
# Defaults a version may set; the same names and ranges as OpenAI's chat parameters.
PARAMETERS: dict[str, tuple[type | tuple[type, ...], float | None, float | None]] = {
    "temperature": ((int, float), 0.0, 2.0),
    "top_p": ((int, float), 0.0, 1.0),
    "max_tokens": (int, 1, 2**31 - 1),
    "seed": (int, -(2**63), 2**63 - 1),
    "stop": ((str, list), None, None),
}


def _invalid(message: str, param: str, error: errors.ErrorCode = errors.INVALID_REQUEST):
    return errors.SluiceError(error, message, param=param)


# The longest a `pattern` may take on one value. Python's own regular expressions have no
# time limit, and a pattern such as (a+)+$ takes seconds on 25 characters: long enough to
# stall a web process for everyone. The `regex` module has a timeout.
PATTERN_TIMEOUT_S = 0.05


# Compiling a pattern is not covered by the timeout, and counted repeats are built out
# when it is compiled: (a{1000}){1000} takes most of a second, a{1000000000} all memory.
MAX_PATTERN_LENGTH = 1000
MAX_PATTERN_REPEAT = 1000
MAX_PATTERN_REPEATS_PRODUCT = 100_000
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


@functools.lru_cache(maxsize=1024)
def pattern_problem(pattern: str) -> str | None:
    """Why a `pattern` cannot be used here (too costly to compile, or invalid), or None."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"is longer than {MAX_PATTERN_LENGTH} characters"
    product = 1
    for low, high in _REPEAT.findall(pattern):
        for bound in (low, high):
            if bound and (len(bound) > 4 or int(bound) > MAX_PATTERN_REPEAT):
                return f"repeats something {bound} times (at most {MAX_PATTERN_REPEAT})"
        product *= max(int(low), int(high or 0), 1)
        if product > MAX_PATTERN_REPEATS_PRODUCT:
            return "has counted repeats that multiply past what can be compiled quickly"
    try:
        regex.compile(pattern)
    except regex.error as exc:
        return f"is not a valid regular expression ({exc})"
    return None


def _pattern(validator, pattern: str, instance: Any, schema: dict[str, Any]):
    """The `pattern` keyword, as jsonschema's, but with a time limit."""
    if not validator.is_type(instance, "string"):
        return
    problem = pattern_problem(pattern)
    if problem:  # stored before patterns were checked
        yield ValidationError(f"cannot be checked: the schema's pattern {problem}")
        return
    try:
        found = regex.search(pattern, instance, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError:
        yield ValidationError(f"could not be checked against the pattern {pattern!r} in time")
        return
    if found is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def make_validator(schema: dict[str, Any]):
    """A validator for a stored schema: `$ref`s resolve inside the schema only (nothing is
    ever fetched), and patterns run with a time limit."""
    base = jsonschema.validators.validator_for(schema)
    cls = jsonschema.validators.extend(base, {"pattern": _pattern})
    return cls(schema, registry=referencing.Registry(), format_checker=base.FORMAT_CHECKER)


def schema_errors(validator, value: Any, *, param: str) -> list[ValidationError]:
    """The validation errors of `value`, in path order. A reference the schema cannot
    resolve (stored before references were checked) is the prompt-API's fault, said so."""
    try:
        return sorted(
            validator.iter_errors(value), key=lambda error: [str(part) for part in error.path]
        )
    except (Unresolvable, RecursionError) as exc:
        why = (
            "refers to itself in a loop"
            if isinstance(exc, RecursionError)
            else (f"refers to something it does not contain ({exc})")
        )
        raise errors.SluiceError(
            errors.INTERNAL_ERROR,
            f"This prompt-API's {param} {why}; its owner must publish a corrected version.",
        ) from None


# Keywords that apply a subschema to the same value: a reference loop through only these
# never reaches the end of the value, so validation would recurse for ever.
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_MANY = ("allOf", "anyOf", "oneOf")


def _in_place(node: dict[str, Any], resolver) -> list[Any]:
    children = [node[key] for key in _IN_PLACE_ONE if isinstance(node.get(key), dict)]
    for key in _IN_PLACE_MANY:
        if isinstance(node.get(key), list):
            children.extend(item for item in node[key] if isinstance(item, dict))
    if isinstance(node.get("dependentSchemas"), dict):
        children.extend(v for v in node["dependentSchemas"].values() if isinstance(v, dict))
    reference = node.get("$ref")
    if isinstance(reference, str):
        target = resolver.lookup(reference).contents
        if isinstance(target, dict):
            children.append(target)
    return children


def _reference_loop(schema: dict[str, Any], resolver) -> bool:
    """Whether some subschema reaches itself through references and in-place keywords."""
    done: set[int] = set()

    def visit(node: dict[str, Any], path: set[int]) -> bool:
        if id(node) in path:
            return True
        if id(node) in done:
            return False
        path.add(id(node))
        looped = any(visit(child, path) for child in _in_place(node, resolver))
        path.discard(id(node))
        done.add(id(node))
        return looped

    return any(visit(node, set()) for node in _subschemas(schema))


def _subschemas(schema: Any):
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _references(schema: Any):
    for node in _subschemas(schema):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]


def _keywords(schema: Any, name: str) -> bool:
    return any(name in node for node in _subschemas(schema))


def check_storable(name: str, value: Any) -> None:
    """Refuse JSON that PostgreSQL's JSONB would (NUL, unpaired surrogates, NaN)."""
    problem = problem_in(value, allow_nul=False)
    if problem:
        raise _invalid(f"{name}: {problem}.", name)


def check_json_schema(schema: Any, param: str) -> None:
    """Refuse a JSON Schema that is not itself valid, saying where and why."""
    if not isinstance(schema, dict):
        raise _invalid(f"{param} must be a JSON Schema object.", param, errors.INVALID_SCHEMA)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path) or "(root)"
        raise _invalid(
            f"{param} is not a valid JSON Schema: {exc.message} (at {where}).",
            param,
            errors.INVALID_SCHEMA,
        ) from None
    for keyword in ("$dynamicRef", "$recursiveRef"):
        if _keywords(schema, keyword):
            raise _invalid(
                f"{param} uses {keyword}, which Sluice does not support; use $ref.",
                param,
                errors.INVALID_SCHEMA,
            )
    for node in _subschemas(schema):
        pattern = node.get("pattern")
        problem = pattern_problem(pattern) if isinstance(pattern, str) else None
        if problem:
            raise _invalid(
                f"{param} has a pattern that {problem}: {pattern[:80]!r}.",
                param,
                errors.INVALID_SCHEMA,
            )
    if _keywords(schema, "patternProperties"):
        raise _invalid(
            f"{param} uses patternProperties, which Sluice does not support (property-name "
            "patterns cannot be checked in bounded time); list the properties, or use "
            "propertyNames with a pattern.",
            param,
            errors.INVALID_SCHEMA,
        )
    dialect = schema.get("$schema")
    specification = referencing.jsonschema.specification_with(
        dialect if isinstance(dialect, str) else "", default=referencing.jsonschema.DRAFT202012
    )
    resolver = referencing.Registry().resolver_with_root(specification.create_resource(schema))
    for reference in _references(schema):
        if not reference.startswith("#"):
            raise _invalid(
                f"{param} refers to {reference!r}: only references inside the schema "
                "(#/$defs/...) are allowed; Sluice never fetches a schema.",
                param,
                errors.INVALID_SCHEMA,
            )
        try:
            resolver.lookup(reference)
        except Unresolvable:
            raise _invalid(
                f"{param} refers to {reference!r}, which is not in the schema.",
                param,
                errors.INVALID_SCHEMA,
            ) from None
    if _reference_loop(schema, resolver):
        raise _invalid(
            f"{param} refers to itself in a loop (a $ref that leads back to where it is "
            "without going into a property or an item), which no value could end.",
            param,
            errors.INVALID_SCHEMA,
        )


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty list of {role, content}.", "messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid(f"{where} must be an object with role and content.", where)
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise _invalid(f"{where} has an unknown field {extra[0]!r}.", f"{where}.{extra[0]}")
        if message.get("role") not in ROLES:
            raise _invalid(f"{where}.role must be one of {', '.join(ROLES)}.", f"{where}.role")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise _invalid(f"{where}.content must be a non-empty string.", f"{where}.content")


def check_parameters(parameters: Any) -> None:
    if not isinstance(parameters, dict):
        raise _invalid("parameters must be an object.", "parameters")
    for name, value in parameters.items():
        if name not in PARAMETERS:
            raise _invalid(
                f"Unknown parameter {name!r}; allowed: {', '.join(PARAMETERS)}.",
                f"parameters.{name}",
            )
        kinds, low, high = PARAMETERS[name]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise _invalid(f"parameters.{name} has the wrong type.", f"parameters.{name}")
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise _invalid(f"parameters.{name} must be {span}.", f"parameters.{name}")
        if (
            name == "stop"
            and isinstance(value, list)
            and (len(value) > 4 or not all(isinstance(item, str) and item for item in value))
        ):
            raise _invalid("parameters.stop takes up to 4 non-empty strings.", "parameters.stop")


def check_version_definition(
    *,
    messages: Any,
    input_schema: Any,
    output_type: str,
    output_schema: Any,
    parameters: Any,
) -> None:
    """Every rule a version must satisfy before it can be stored."""
    for name, value in (
        ("messages", messages),
        ("input_schema", input_schema),
        ("output_schema", output_schema),
        ("parameters", parameters),
    ):
        check_storable(name, value)
    check_messages(messages)
    check_json_schema(input_schema, "input_schema")
    if input_schema.get("type") != "object":
        raise _invalid(
            'input_schema must describe an object ("type": "object"): inputs are named.',
            "input_schema",
            errors.INVALID_SCHEMA,
        )
    declared = set(input_schema.get("properties", {}))
    for message in messages:
        for name in TEMPLATE_VARIABLE.findall(message["content"]):
            if name not in declared:
                raise _invalid(
                    f"The template uses {{{{{name}}}}} but input_schema declares no "
                    f"property {name!r}.",
                    "messages",
                )
    if output_type not in ("text", "json"):
        raise _invalid("output_type must be 'text' or 'json'.", "output_type")
    if output_schema is not None:
        if output_type != "json":
            raise _invalid(
                "output_schema applies only when output_type is 'json'.", "output_schema"
            )
        check_json_schema(output_schema, "output_schema")
    check_parameters(parameters)


def render_messages(messages: list[dict[str, str]], inputs: dict[str, Any]) -> list[dict[str, str]]:
    """Substitute {{variables}} with inputs; non-string values are written as JSON."""
    import json

    def value(match) -> str:
        item = inputs.get(match.group(1), "")
        return item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)

    return [
        {"role": message["role"], "content": TEMPLATE_VARIABLE.sub(value, message["content"])}
        for message in messages
    ]
