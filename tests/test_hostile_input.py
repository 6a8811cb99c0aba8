"""Input crafted to break things further in: answered with a clear 4xx, never a 500, and
never allowed to stall the process or reach out of it.

Each case here was once a 500 (or worse) found by fuzzing the running gateway.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from gateway import prompts
from gateway.catalog import Catalog
from sluice import parsers
from sluice.errors import SluiceError
from tenants.models import parse_raw_key

from .conftest import published_prompt_api
from .test_v1_bad_input import CHAT, call, refused, setup  # noqa: F401 (fixture)

TEXT_INPUT = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
}


def raw(setup, path: str, content: bytes, **headers) -> httpx.Response:  # noqa: F811
    return call(
        setup, path, content=content, headers={"Content-Type": "application/json", **headers}
    )


# --- the body ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["chat/completions", "completions", "embeddings"])
def test_a_body_nested_thousands_deep_is_invalid_json(setup, path):  # noqa: F811
    reply = raw(setup, path, b"[" * 5000 + b"]" * 5000)
    assert "nested" in refused(reply, 400, "invalid_json")["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}),
        ("chat/completions", {**CHAT, "messages": [{"role": "\ud800", "content": "hi"}]}),
        ("chat/completions", {**CHAT, "\ud800": 1}),
        ("completions", {"model": "fixed-chat", "prompt": "a\udfffb"}),
        ("embeddings", {"model": "fixed-embed", "input": ["ok", "\ud800"]}),
        ("embeddings", {"model": "fixed-embed", "input": "x", "encoding_format": "\ud800"}),
    ],
)
def test_an_unpaired_surrogate_is_invalid_json(setup, path, body):  # noqa: F811
    # json.dumps writes the surrogate as a \ud800 escape, as a hostile client would.
    reply = raw(setup, path, json.dumps(body).encode())
    assert "surrogate" in refused(reply, 400, "invalid_json")["message"]


def test_options_is_answered_not_crashed(setup):  # noqa: F811
    for path in ("models", "chat/completions", "apis/summarize"):
        reply = httpx.options(
            f"{setup['base']}/v1/{path}", headers={"Authorization": f"Bearer {setup['key']}"}
        )
        assert reply.status_code < 500, reply.text


# --- the key, the model, the version -----------------------------------------------------


def test_a_key_with_characters_outside_its_alphabet_is_just_invalid(setup):  # noqa: F811
    good = setup["key"]
    assert parse_raw_key(good[:-1] + "\x00") is None
    for bad in (good[:-1] + "\u00e9", good.replace("_", "\u00e9", 1)):
        assert parse_raw_key(bad) is None
        reply = httpx.get(
            f"{setup['base']}/v1/models",
            headers={"Authorization": f"Bearer {bad}".encode("latin-1")},
        )
        refused(reply, 401, "invalid_api_key")


@pytest.mark.parametrize("name", ["x" * 300, "%C3%A9t%C3%A9", "a:b:..", "-x"])
def test_a_model_name_no_deployment_could_have_is_not_found(setup, name):  # noqa: F811
    reply = httpx.get(
        f"{setup['base']}/v1/models/{name}", headers={"Authorization": f"Bearer {setup['key']}"}
    )
    refused(reply, 404, "model_not_found")


@pytest.fixture
def summarize(setup, alpha, alice):  # noqa: F811
    from gateway.models import ModelDeployment

    return published_prompt_api(
        tenant=alpha,
        user=alice,
        slug="summarize",
        deployment=ModelDeployment.objects.get(slug="fixed-chat"),
        messages=[{"role": "user", "content": "Summarize: {{text}}"}],
        input_schema={
            "type": "object",
            "properties": {"text": {"type": "string", "pattern": "(a|aa)+$"}},
            "required": ["text"],
        },
    )


@pytest.mark.parametrize("version", ["%C2%B2", "%D9%A1", "1.0", "99999999999999999999"])
def test_a_version_that_is_not_plain_digits_is_refused(setup, summarize, version):  # noqa: F811
    reply = call(setup, f"apis/summarize?version={version}", {"inputs": {"text": "aaa"}})
    assert reply.status_code in (400, 404), reply.text
    refused(reply, reply.status_code, "", "version")


def test_a_catastrophic_pattern_cannot_stall_the_gateway(setup, summarize):  # noqa: F811
    # (a|aa)+$ on 60 a's and a '!' would take any backtracking engine hours; the gateway
    # gives up after PATTERN_TIMEOUT_S and says so.
    started = time.monotonic()
    reply = call(setup, "apis/summarize", {"inputs": {"text": "a" * 60 + "!"}})
    elapsed = time.monotonic() - started
    error = refused(reply, 400, "invalid_request", "inputs.text")
    assert "in time" in error["message"]
    assert elapsed < 30  # not a timing assertion: only "it did not hang"


# --- prompt-API definitions ---------------------------------------------------------------


def check(**overrides):
    definition = {
        "messages": [{"role": "user", "content": "{{text}}"}],
        "input_schema": TEXT_INPUT,
        "output_type": "text",
        "output_schema": None,
        "parameters": {},
        **overrides,
    }
    with pytest.raises(SluiceError) as refusal:
        prompts.check_version_definition(**definition)
    return refusal.value


@pytest.mark.parametrize(
    ("schema", "said"),
    [
        ({**TEXT_INPUT, "properties": {"text": {"$ref": "#/$defs/nope"}}}, "not in the schema"),
        (
            {**TEXT_INPUT, "properties": {"text": {"$ref": "http://127.0.0.1:9/s.json"}}},
            "never fetches",
        ),
        ({**TEXT_INPUT, "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
        (
            {
                **TEXT_INPUT,
                "$defs": {"a": {"$ref": "#/$defs/a"}},
                "properties": {"text": {"$ref": "#/$defs/a"}},
            },
            "in a loop",
        ),
        ({"$ref": "#", "type": "object"}, "in a loop"),
        (
            {
                **TEXT_INPUT,
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}},
                "properties": {"text": {"$ref": "#/$defs/a"}},
            },
            "in a loop",
        ),
        ({**TEXT_INPUT, "properties": {"text": {"$dynamicRef": "#meta"}}}, "$dynamicRef"),
        (
            {**TEXT_INPUT, "properties": {"text": {"pattern": "a{1000000000}"}}},
            "repeats something",
        ),
        ({**TEXT_INPUT, "properties": {"text": {"pattern": "(a{1000}){1000}"}}}, "multiply"),
        ({**TEXT_INPUT, "propertyNames": {"pattern": "x{99999}"}}, "repeats something"),
    ],
)
def test_schemas_that_would_fetch_or_cannot_resolve_are_refused(schema, said):
    refusal = check(input_schema=schema)
    assert refusal.error.code == "invalid_schema"
    assert said in refusal.message


def test_a_recursive_schema_that_descends_is_fine():
    # A tree: each level is a property of the one above, so validation ends with the value.
    tree = {**TEXT_INPUT, "properties": {"text": {"type": "string"}, "child": {"$ref": "#"}}}
    prompts.check_json_schema(tree, "input_schema")
    validator = prompts.make_validator(tree)
    assert not prompts.schema_errors(
        validator, {"text": "a", "child": {"text": "b", "child": {"text": "c"}}}, param="x"
    )


def test_a_stored_schema_that_loops_is_the_prompt_apis_fault_not_a_crash():
    validator = prompts.make_validator({"$ref": "#"})
    with pytest.raises(SluiceError) as refusal:
        prompts.schema_errors(validator, {"a": 1}, param="output_schema")
    assert "in a loop" in refusal.value.message


def test_a_stored_costly_pattern_is_refused_at_call_time_without_compiling_it():
    validator = prompts.make_validator(
        {"type": "object", "properties": {"text": {"type": "string", "pattern": "a{1000000000}"}}}
    )
    [error] = prompts.schema_errors(validator, {"text": "a"}, param="input_schema")
    assert "cannot be checked" in error.message


def test_a_reference_inside_the_schema_is_fine():
    schema = {
        **TEXT_INPUT,
        "properties": {"text": {"$ref": "#/$defs/short"}},
        "$defs": {"short": {"type": "string", "maxLength": 5}},
    }
    prompts.check_version_definition(
        messages=[{"role": "user", "content": "{{text}}"}],
        input_schema=schema,
        output_type="text",
        output_schema=None,
        parameters={},
    )
    validator = prompts.make_validator(schema)
    assert not prompts.schema_errors(validator, {"text": "abc"}, param="input_schema")
    assert prompts.schema_errors(validator, {"text": "abcdefg"}, param="input_schema")


@pytest.mark.parametrize(
    "overrides",
    [
        {"messages": [{"role": "user", "content": "\x00 {{text}}"}]},
        {"messages": [{"role": "user", "content": "\ud800 {{text}}"}]},
        {"parameters": {"temperature": float("nan")}},
        {"input_schema": {**TEXT_INPUT, "maximum": float("inf")}},
    ],
)
def test_text_postgresql_cannot_store_is_refused_before_it_is_stored(overrides):
    assert check(**overrides).error.status == 400


def test_a_stored_schema_with_a_dangling_reference_is_the_prompt_apis_fault():
    validator = prompts.make_validator({"$ref": "#/$defs/gone"})
    with pytest.raises(SluiceError) as refusal:
        prompts.schema_errors(validator, {"text": "x"}, param="input_schema")
    assert refusal.value.error.status == 500
    assert "publish a corrected version" in refusal.value.message


# --- the parsers and the catalog ----------------------------------------------------------


def test_problem_in_names_where_the_problem_is():
    assert parsers.problem_in({"a": [{"b": "x\x00"}]}, allow_nul=True) is None
    assert "a[0].b" in parsers.problem_in({"a": [{"b": "x\x00"}]}, allow_nul=False)
    assert "surrogate" in parsers.problem_in({"a": "\udc00"}, allow_nul=True)
    assert "nested" in parsers.problem_in(json.loads("[" * 100 + "]" * 100), allow_nul=True)
    assert parsers.problem_in({"ok": ["é", 1.5, None, True]}, allow_nul=False) is None


def test_the_catalog_stops_caching_misses_when_full(monkeypatch, settings):
    from gateway import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "MAX_SLOTS", 3)
    catalog = Catalog()
    now = time.monotonic()
    for name in ("a", "b", "c"):
        assert catalog._room(now, for_miss=True)
        catalog._slots[("deployment", name)] = catalog_module._Slot(None, now)
    assert not catalog._room(now, for_miss=True)  # full of fresh misses
    assert catalog._room(now, for_miss=False)  # a real row still gets in
    later = now + settings.CATALOG_TTL_S + 1
    assert catalog._room(later, for_miss=True)  # expired slots made room
    assert len(catalog._slots) == 0


def test_a_chunked_body_is_read(setup):  # noqa: F811
    # No Content-Length: the body comes in chunks (a generator makes httpx send it so).
    def chunks():
        yield json.dumps(CHAT).encode()

    reply = call(
        setup,
        "chat/completions",
        content=chunks(),
        headers={"Content-Type": "application/json", "X-Request-Timeout": "0.2"},
    )
    # Admitted and queued (no worker runs here): the body was read, not taken as empty.
    assert reply.status_code == 504, reply.text


@pytest.mark.parametrize(
    ("field", "value"), [("seed", 2**70), ("seed", -(2**64)), ("max_tokens", 2**40)]
)
def test_integers_beyond_what_a_model_takes_are_refused_by_name(setup, field, value):  # noqa: F811
    refused(call(setup, "chat/completions", {**CHAT, field: value}), 400, "invalid_request", field)


@pytest.mark.parametrize(
    "url", ["/v1/models/%00", "/v1/models/a%00b", "/api/deployments/?x=%00", "/admin/?q=%00"]
)
def test_a_nul_in_the_url_is_a_400_before_anything_looks_it_up(setup, url):  # noqa: F811
    reply = httpx.get(setup["base"] + url, headers={"Authorization": f"Bearer {setup['key']}"})
    assert reply.status_code == 400, reply.text
    if not url.startswith("/admin/"):
        refused(reply, 400, "invalid_request")


@pytest.mark.parametrize("path", ["models/", "chat/completions/", "nope", "apis/"])
def test_unknown_paths_under_v1_are_json_404s_even_in_debug(setup, path, settings):  # noqa: F811
    settings.DEBUG = True  # where Django would answer its HTML technical 404 page
    reply = httpx.get(
        f"{setup['base']}/v1/{path}", headers={"Authorization": f"Bearer {setup['key']}"}
    )
    refused(reply, 404, "not_found")


def test_an_oversize_chunked_body_is_a_413(setup):  # noqa: F811
    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    reply = call(
        setup, "chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    refused(reply, 413, "request_too_large")
