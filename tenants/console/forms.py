"""Console forms: they parse and shape input; the services decide what is allowed."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, time, timedelta
from typing import Any

from django import forms
from django.utils import timezone

from gateway.models import PromptApi, PromptApiVersion
from sluice.errors import SluiceError
from sluice.parsers import problem_in
from tenants.models import QUOTA_FIELDS, Role, Scope
from tenants.services import INVITE_EMAIL_MAX_LENGTH, LATEST_KEY_EXPIRY, quota_maximum

QUOTA_LABELS = {
    "requests_per_minute": "Requests per minute (per key)",
    "tokens_per_minute": "Tokens per minute",
    "monthly_token_budget": "Monthly token budget",
    "max_tokens_cap": "max_tokens cap per request",
}


def add_service_error(form: forms.Form, exc: SluiceError) -> None:
    """Attach a service's refusal to the field its `param` names, else to the whole form."""
    field = re.split(r"[.\[]", exc.param)[0] if exc.param else None
    form.add_error(field if field in form.fields else None, exc.message)


# --- API keys -----------------------------------------------------------------------------


class ApiKeyForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        widget=forms.TextInput(attrs={"placeholder": "e.g. ci-pipeline", "autofocus": True}),
        help_text="Something that tells you later where this key is used.",
    )
    scopes = forms.MultipleChoiceField(
        choices=Scope.choices,
        initial=[Scope.INFERENCE],
        widget=forms.CheckboxSelectMultiple,
        error_messages={"required": "Pick at least one scope."},
    )
    expires_on = forms.DateField(
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        help_text="Optional. The key works through the end of this day (UTC).",
    )

    def clean_expires_on(self):
        value = self.cleaned_data.get("expires_on")
        if value is not None and value < timezone.now().date():
            raise forms.ValidationError("Pick today or a later date.")
        # The key works through the end of the day, so it expires at the next midnight.
        if value is not None and value >= LATEST_KEY_EXPIRY.date():
            latest = LATEST_KEY_EXPIRY.date() - timedelta(days=1)
            raise forms.ValidationError(
                f"Pick {latest:%Y-%m-%d} or an earlier date, or leave it empty for a key "
                "that never expires."
            )
        return value

    def expires_at(self) -> datetime | None:
        value = self.cleaned_data.get("expires_on")
        if value is None:
            return None
        return datetime.combine(value + timedelta(days=1), time.min, tzinfo=UTC)


# --- access requests ------------------------------------------------------------------------

_JUSTIFICATION = {
    "required": False,
    "max_length": 2000,
    "widget": forms.Textarea(attrs={"rows": 2, "placeholder": "What will you use it for?"}),
}


class DeploymentRequestForm(forms.Form):
    deployment = forms.ModelChoiceField(queryset=None, to_field_name="slug", empty_label=None)
    justification = forms.CharField(**_JUSTIFICATION)

    def __init__(self, *args: Any, deployments, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["deployment"].queryset = deployments
        self.fields["deployment"].label_from_instance = lambda d: (
            f"{d.slug} — {d.name} ({d.get_task_display()})"
        )


class PromptApiRequestForm(forms.Form):
    prompt_api = forms.ModelChoiceField(
        queryset=None, to_field_name="slug", empty_label=None, label="Prompt-API"
    )
    justification = forms.CharField(**_JUSTIFICATION)

    def __init__(self, *args: Any, prompt_apis, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["prompt_api"].queryset = prompt_apis
        self.fields["prompt_api"].label_from_instance = lambda p: (
            f"{p.slug} — {p.name} ({p.tenant.name if p.tenant else 'platform'})"
        )


class QuotaRequestForm(forms.Form):
    justification = forms.CharField(**_JUSTIFICATION)

    def __init__(self, *args: Any, limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in reversed(QUOTA_FIELDS):
            current = getattr(limits, name)
            field = forms.IntegerField(
                required=False,
                min_value=1,
                max_value=quota_maximum(name),
                label=QUOTA_LABELS[name],
                help_text=f"Now {current:,}.",
                widget=forms.NumberInput(attrs={"placeholder": f"more than {current:,}"}),
            )
            self.fields = {name: field, **self.fields}

    def clean(self):
        cleaned = super().clean()
        if not self.errors and not self.quota():
            raise forms.ValidationError("Fill in at least one limit to raise.")
        return cleaned

    def quota(self) -> dict[str, int]:
        return {
            name: self.cleaned_data[name]
            for name in QUOTA_FIELDS
            if self.cleaned_data.get(name) is not None
        }


class ReviewForm(forms.Form):
    note = forms.CharField(
        required=False,
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "Optional note for the requester"}),
    )


# --- prompt-APIs --------------------------------------------------------------------------


class PromptApiForm(forms.Form):
    name = forms.CharField(max_length=100, widget=forms.TextInput(attrs={"autofocus": True}))
    slug = forms.SlugField(
        max_length=80,
        help_text="Part of the endpoint, /v1/apis/<slug>; unique across Sluice; cannot change.",
    )
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))
    visibility = forms.ChoiceField(
        choices=PromptApi.Visibility.choices,
        initial=PromptApi.Visibility.PRIVATE,
        widget=forms.RadioSelect,
    )


class _NotANumber(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotANumber(name)  # NaN, Infinity, -Infinity: Python's json accepts them


class JsonTextField(forms.CharField):
    """A textarea holding JSON; a parse error says where, in words a person can act on."""

    widget = forms.Textarea

    def __init__(self, *, expect: type, **kwargs: Any) -> None:
        self.expect = expect
        attrs = {"rows": 8, "class": "code", "spellcheck": "false"}
        kwargs.setdefault("widget", forms.Textarea(attrs=attrs))
        super().__init__(**kwargs)

    def to_python(self, value: Any) -> Any:
        text = super().to_python(value)
        if text in self.empty_values:
            return None
        try:
            parsed = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(
                f"This is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
            ) from None
        except RecursionError:
            raise forms.ValidationError("This JSON is nested too deeply.") from None
        except _NotANumber as exc:
            raise forms.ValidationError(
                f"This JSON holds {exc}, which is not a number JSON has."
            ) from None
        except ValueError:  # Python reads integers of at most 4300 digits
            raise forms.ValidationError("This JSON holds a number too long to read.") from None
        if not isinstance(parsed, self.expect):
            wanted = "a JSON array [...]" if self.expect is list else "a JSON object {...}"
            raise forms.ValidationError(f"This must be {wanted}.")
        # NUL characters and unpaired surrogates (from \u escapes) cannot be stored, nor can
        # numbers too large for a float; deep nesting could not be checked safely later.
        problem = problem_in(parsed, allow_nul=False)
        if problem:
            raise forms.ValidationError(f"This JSON cannot be stored: {problem}.")
        return parsed

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | dict):
            return json.dumps(value, indent=2, ensure_ascii=False)
        return value


MESSAGES_EXAMPLE = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Summarize in one sentence:\n\n{{text}}"},
]
INPUT_SCHEMA_EXAMPLE = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 20000}},
    "required": ["text"],
    "additionalProperties": False,
}


class VersionForm(forms.Form):
    deployment = forms.ModelChoiceField(
        queryset=None,
        to_field_name="slug",
        empty_label=None,
        help_text="A chat or completion model; your tenant needs a subscription to publish.",
    )
    messages = JsonTextField(
        expect=list,
        help_text="Chat messages; {{name}} is replaced by inputs.name. "
        'Example: [{"role": "user", "content": "Hello {{name}}"}]',
    )
    input_schema = JsonTextField(
        expect=dict, help_text='A JSON Schema with "type": "object" declaring every {{variable}}.'
    )
    output_type = forms.ChoiceField(
        choices=PromptApiVersion.OutputType.choices, initial=PromptApiVersion.OutputType.TEXT
    )
    output_schema = JsonTextField(
        expect=dict, required=False, help_text="Optional; only for JSON output."
    )
    parameters = JsonTextField(
        expect=dict,
        required=False,
        help_text='Optional defaults, e.g. {"temperature": 0.2, "max_tokens": 256}.',
    )
    changelog = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 2}), help_text="What changed."
    )

    def __init__(self, *args: Any, deployments, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["deployment"].queryset = deployments
        self.fields["deployment"].label_from_instance = lambda d: f"{d.slug} — {d.name}"
        for name in ("messages", "input_schema"):
            self.fields[name].widget.attrs["rows"] = 14
        for name in ("output_schema", "parameters"):
            self.fields[name].widget.attrs["rows"] = 6

    def fields_for_service(self) -> dict[str, Any]:
        data = dict(self.cleaned_data)
        data["parameters"] = data.get("parameters") or {}
        return data


# --- members ------------------------------------------------------------------------------


def role_choices(*, include_owner: bool) -> list[tuple[str, str]]:
    return [(value, label) for value, label in Role.choices if include_owner or value != Role.OWNER]


class InviteForm(forms.Form):
    email = forms.EmailField(
        max_length=INVITE_EMAIL_MAX_LENGTH,
        widget=forms.EmailInput(attrs={"placeholder": "name@example.com"}),
    )
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER)

    def __init__(self, *args: Any, include_owner: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["role"].choices = role_choices(include_owner=include_owner)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)
