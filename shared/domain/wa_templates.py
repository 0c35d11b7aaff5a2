"""WhatsApp template messages: ``content.template`` as the Cloud API takes it.

A business may start a conversation on WhatsApp only with a template its account had
approved; free-form text and images go only to a contact who wrote in within 24 hours. A
broadcast's template is ``{name, language, components}``: a header (text, or an image from the
workspace's media), body parameters, and button parameters, in the shapes of the Cloud API's
``template`` object. The text of every parameter may use personalisation placeholders
(``{{name}}``); they are rendered for each recipient when it is sent.

What is checked here is what the Cloud API would refuse whatever the approved template says
(names, language codes, lengths, characters a parameter may not hold, a button's index given
twice); whether the parameters match the approved template is the Cloud API's to say (its
132xxx errors pause the broadcast with the reason).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.domain import templates
from shared.domain.types import Id, Text

#: Longest text of one body parameter, and of a header's text parameter.
MAX_BODY_PARAM = 1024
MAX_HEADER_TEXT = 60
#: Longest quick-reply payload and URL-button suffix.
MAX_BUTTON_PARAM = 1000
MAX_BODY_PARAMS = 100
MAX_BUTTONS = 10
_TABS_OR_SPACES = re.compile(r"[\n\t]| {5,}")
_NAME = re.compile(r"[a-z0-9_]+")
_LANGUAGE = re.compile(r"[a-z]{2,3}(_[A-Z]{2}|_[A-Za-z]{4})?")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _error(
    loc: tuple[int | str, ...], message: str, value: Any, kind: str = "value_error"
) -> InitErrorDetails:
    """An error at ``loc`` under the field being validated, saying ``message``."""
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)


def _invalid(errors: list[InitErrorDetails]) -> ValidationError:
    return ValidationError.from_exception_data("WhatsappTemplate", errors)


def _no_layout(value: str) -> str:
    # The Cloud API refuses (132018) a parameter holding a line break, a tab or more than
    # four spaces in a row: it would change the approved layout.
    if _TABS_OR_SPACES.search(value):
        raise ValueError("must not hold a line break, a tab or more than four spaces in a row")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


class TextParameter(_Strict):
    type: Literal["text"]
    text: Text = Field(min_length=1, max_length=MAX_BODY_PARAM)

    _layout = field_validator("text")(_no_layout)


class ImageParameter(_Strict):
    """A header image: one of the workspace's uploads, sent as a signed link."""

    type: Literal["image"]
    media_id: Id


class HeaderTextParameter(TextParameter):
    """A header's text: shorter than a body's."""

    @field_validator("text")
    @classmethod
    def _short(cls, value: str) -> str:
        if len(value) > MAX_HEADER_TEXT:
            raise ValueError(f"a header's text is at most {MAX_HEADER_TEXT} characters")
        return value


class HeaderComponent(_Strict):
    type: Literal["header"]
    parameters: list[
        Annotated[HeaderTextParameter | ImageParameter, Field(discriminator="type")]
    ] = Field(min_length=1, max_length=1)


class BodyComponent(_Strict):
    type: Literal["body"]
    parameters: list[TextParameter] = Field(min_length=1, max_length=MAX_BODY_PARAMS)


class PayloadParameter(_Strict):
    type: Literal["payload"]
    payload: Text = Field(min_length=1, max_length=MAX_BUTTON_PARAM)


class UrlSuffixParameter(_Strict):
    type: Literal["text"]
    text: Text = Field(min_length=1, max_length=MAX_BUTTON_PARAM)


class ButtonComponent(_Strict):
    type: Literal["button"]
    sub_type: Literal["quick_reply", "url"]
    index: int = Field(ge=0, lt=MAX_BUTTONS, description="The button's place in the template.")
    parameters: list[
        Annotated[PayloadParameter | UrlSuffixParameter, Field(discriminator="type")]
    ] = Field(min_length=1, max_length=1)

    @model_validator(mode="after")
    def _fits_sub_type(self) -> ButtonComponent:
        wanted = PayloadParameter if self.sub_type == "quick_reply" else UrlSuffixParameter
        given = self.parameters[0]
        if not isinstance(given, wanted):
            shape = "payload" if self.sub_type == "quick_reply" else "text"
            message = f"a {self.sub_type} button takes one parameter of type {shape!r}"
            raise _invalid([_error(("parameters", 0, "type"), message, given.type)])
        return self


Component = Annotated[
    HeaderComponent | BodyComponent | ButtonComponent, Field(discriminator="type")
]

_COMPONENT_TAGS = frozenset({"header", "body", "button"})
_PARAMETER_TAGS = frozenset({"text", "image", "payload"})


def _untagged(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """An error's place in ``components`` as the request has it. A discriminated union puts
    the tag it chose in the place (``[0].header.parameters[0].text.text``); the request has
    no such key. A body's parameters are of one type, without a tag.
    """
    path = list(loc)
    if len(path) > 1 and isinstance(path[0], int) and path[1] in _COMPONENT_TAGS:
        kind = path.pop(1)
        tagged = kind != "body" and len(path) > 3 and path[1] == "parameters"
        if tagged and isinstance(path[2], int) and path[3] in _PARAMETER_TAGS:
            del path[3]
    return tuple(path)


class WhatsappTemplate(_Strict):
    """An approved template and the values of its parameters."""

    name: str = Field(
        min_length=1,
        max_length=512,
        description="The template's name as approved: lowercase letters, digits, underscores.",
    )
    language: str = Field(
        max_length=12,
        description="The template's language code, e.g. en, en_US, pt_BR, zh_Hant.",
    )

    @field_validator("name")
    @classmethod
    def _approved_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                "must be the template's name as approved: lowercase letters, digits and "
                "underscores only, e.g. spring_sale"
            )
        return value

    @field_validator("language")
    @classmethod
    def _language_code(cls, value: str) -> str:
        if not _LANGUAGE.fullmatch(value):
            raise ValueError("must be a WhatsApp language code such as en, en_US, pt_BR or zh_Hant")
        return value

    components: list[Component] = Field(default_factory=list, max_length=2 + MAX_BUTTONS)

    @field_validator("components", mode="wrap")
    @classmethod
    def _once_each(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> list[Any]:
        try:
            components: list[Any] = handler(value)
        except ValidationError as exc:
            # Placed where the request has them, without the tags of the unions on the way.
            raise _invalid(
                [
                    _error(
                        _untagged(e["loc"]),
                        e["msg"].removeprefix("Value error, "),
                        e["input"],
                        e["type"],
                    )
                    for e in exc.errors(include_url=False)
                ]
            ) from None
        errors: list[InitErrorDetails] = []
        first: dict[str | int, int] = {}
        for i, c in enumerate(components):
            if c.type == "button":
                seen = first.setdefault(c.index, i)
                if seen != i:
                    message = (
                        f"button index {c.index} is given twice: components[{seen}] has it too"
                    )
                    errors.append(_error((i, "index"), message, c.index))
            elif first.setdefault(c.type, i) != i:
                message = (
                    f"has more than one {c.type}: components[{first[c.type]}] is the "
                    f"template's {c.type}"
                )
                errors.append(_error((i,), message, c.type))
        if errors:
            raise _invalid(errors)
        return components

    def texts(self) -> list[tuple[str, str]]:
        """Every parameter text, with its field path under the template."""
        found: list[tuple[str, str]] = []
        for i, c in enumerate(self.components):
            for j, p in enumerate(c.parameters):
                if isinstance(p, PayloadParameter):
                    found.append((f"components[{i}].parameters[{j}].payload", p.payload))
                elif not isinstance(p, ImageParameter):
                    found.append((f"components[{i}].parameters[{j}].text", p.text))
        return found

    def images(self) -> list[tuple[str, int]]:
        """Every header image's media id, with its field path under the template."""
        return [
            (f"components[{i}].parameters[{j}].media_id", p.media_id)
            for i, c in enumerate(self.components)
            for j, p in enumerate(c.parameters)
            if isinstance(p, ImageParameter)
        ]

    def media_ids(self) -> list[int]:
        return [
            p.media_id
            for c in self.components
            for p in c.parameters
            if isinstance(p, ImageParameter)
        ]


class NotRenderable(ValueError):
    """A template's parameter, personalised for one recipient, is one the Cloud API would
    refuse (blank, or too long): that recipient cannot be sent this template.
    """


#: The longest value of a parameter, by the component it is in.
_LIMITS = {"header": MAX_HEADER_TEXT, "body": MAX_BODY_PARAM, "button": MAX_BUTTON_PARAM}
_LAYOUT = re.compile(r"[\r\n\t]")
_SPACES = re.compile(r" {5,}")


def _personalised(value: str, where: str, limit: int) -> str:
    """A rendered parameter as the Cloud API takes it: a contact's line breaks and tabs made
    spaces and long runs of spaces cut to four (the template's own text was checked when
    written); ``NotRenderable`` when it is blank or longer than ``limit``.
    """
    value = _SPACES.sub("    ", _LAYOUT.sub(" ", value))
    if not value.strip():
        raise NotRenderable(f"template parameter {where} is empty for this recipient")
    if len(value) > limit:
        raise NotRenderable(
            f"template parameter {where} is {len(value)} characters for this recipient; "
            f"at most {limit}"
        )
    return value


def cloud_api_object(
    template: dict[str, Any],
    address: str,
    contact: dict[str, Any] | None,
    media_urls: dict[int, str],
) -> dict[str, Any]:
    """The Cloud API's ``template`` object for one recipient: parameters rendered, header
    images as links (``media_urls`` by media id), button indexes as the strings it takes.
    Raises ``NotRenderable`` when a personalised parameter comes out blank or too long.
    """
    components = []
    for i, c in enumerate(template.get("components") or []):
        parameters = []
        for j, p in enumerate(c.get("parameters") or []):
            if p.get("type") == "image":
                parameters.append({"type": "image", "image": {"link": media_urls[p["media_id"]]}})
                continue
            key = "payload" if p.get("type") == "payload" else "text"
            parsed = templates.stored(p.get(key))
            value = p.get(key)
            if parsed is not None:
                where = f"components[{i}].parameters[{j}]"
                value = _personalised(
                    parsed.render(address, contact), where, _LIMITS.get(c["type"], MAX_BODY_PARAM)
                )
            parameters.append({"type": p["type"], key: value})
        out: dict[str, Any] = {"type": c["type"], "parameters": parameters}
        if c["type"] == "button":
            out["sub_type"] = c["sub_type"]
            out["index"] = str(c["index"])
        components.append(out)
    return {
        "name": template["name"],
        "language": {"code": template["language"]},
        "components": components,
    }
