"""Twenty JSON schemas for the structured-output tests: every type xgrammar constrains, kept bounded (string and
array lengths, integer ranges, enums) so that even a random tiny model completes each within a few dozen tokens."""

from __future__ import annotations


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


FLAG = {"type": "boolean"}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
COLOR = {"enum": ["red", "green", "blue"]}
SHORT = {"type": "string", "pattern": "^[a-z]{0,4}$"}

SCHEMAS: list[dict] = [
    _obj({"ok": FLAG}),
    _obj({"n": DIGIT}),
    _obj({"color": COLOR}),
    _obj({"word": SHORT}),
    _obj({"ok": FLAG, "n": DIGIT}),
    _obj({"ok": FLAG, "color": COLOR, "n": DIGIT}),
    _obj({"tags": {"type": "array", "items": COLOR, "maxItems": 3}}),
    _obj({"pair": {"type": "array", "items": DIGIT, "minItems": 2, "maxItems": 2}}),
    _obj({"inner": _obj({"ok": FLAG})}),
    _obj({"inner": _obj({"n": DIGIT, "color": COLOR})}),
    _obj({"kind": {"const": "point"}, "x": DIGIT, "y": DIGIT}),
    _obj({"level": {"enum": [1, 2, 3]}}),
    _obj({"maybe": {"anyOf": [FLAG, {"type": "null"}]}}),
    _obj({"choice": {"anyOf": [COLOR, DIGIT]}}),
    _obj({"a": FLAG, "b": FLAG, "c": FLAG, "d": FLAG}),
    _obj({"grid": {"type": "array", "items": {"type": "array", "items": FLAG, "maxItems": 2}, "maxItems": 2}}),
    _obj({"name": SHORT, "age": {"type": "integer", "minimum": 10, "maximum": 99}}),
    _obj({"ok": FLAG, "note": SHORT}, required=["ok"]),
    {"type": "array", "items": COLOR, "minItems": 1, "maxItems": 3},
    _obj({"items": {"type": "array", "items": _obj({"id": DIGIT}), "maxItems": 2}}),
]
