"""The project's structured-output schemas: (name, prompt, schema), each small enough (bounded
strings, arrays and numbers) that a valid answer fits the tests' token budget."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "maxLength": 20}
SHORT = {"type": "string", "maxLength": 12}


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """An object with exactly these properties (all required unless said otherwise)."""
    needed = list(properties) if required is None else required
    return {"type": "object", "properties": properties, "required": needed, "additionalProperties": False}


SCHEMAS: list[tuple[str, str, Any]] = [
    (
        "person",
        "Describe a person called Alice.",
        obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    ),
    (
        "weather",
        "Report the weather in Paris.",
        obj(
            {
                "city": NAME,
                "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60},
                "condition": {"enum": ["sunny", "cloudy", "rain", "snow"]},
            }
        ),
    ),
    ("todo", "List two chores.", obj({"items": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3}})),
    (
        "flags",
        "Is the shop open, and does it have parking?",
        obj({"is_open": {"type": "boolean"}, "has_parking": {"type": "boolean"}}),
    ),
    (
        "address",
        "Give Bob's address.",
        obj(
            {
                "name": NAME,
                "address": obj({"street": NAME, "city": SHORT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
            }
        ),
    ),
    (
        "rgb",
        "Give the colour orange as RGB.",
        obj({c: {"type": "integer", "minimum": 0, "maximum": 255} for c in "rgb"}),
    ),
    (
        "book",
        "Describe a famous novel.",
        obj(
            {
                "title": NAME,
                "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
                "genres": {
                    "type": "array",
                    "items": {"enum": ["fiction", "drama", "crime", "poetry"]},
                    "minItems": 1,
                    "maxItems": 2,
                },
            }
        ),
    ),
    (
        "rating",
        "Rate the film Jaws.",
        obj(
            {"title": NAME, "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "recommend": {"type": "boolean"}}
        ),
    ),
    (
        "points",
        "Give two points on a grid.",
        {
            "type": "array",
            "items": obj(
                {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                }
            ),
            "minItems": 2,
            "maxItems": 3,
        },
    ),
    ("answer", "Will it rain tomorrow? Answer yes, no or maybe.", {"enum": ["yes", "no", "maybe"]}),
    (
        "product",
        "Describe a product in a shop.",
        obj(
            {
                "name": NAME,
                "price": {"type": "integer", "exclusiveMinimum": 0, "maximum": 999},
                "in_stock": {"type": "boolean"},
                "tags": {"type": "array", "items": SHORT, "maxItems": 2},
            }
        ),
    ),
    (
        "event",
        "Plan a party.",
        obj(
            {
                "name": NAME,
                "date": {"type": "string", "format": "date"},
                "guests": {"type": "integer", "minimum": 1, "maximum": 500},
            }
        ),
    ),
    (
        "recipe",
        "Give a simple recipe.",
        obj(
            {
                "dish": NAME,
                "servings": {"type": "integer", "minimum": 1, "maximum": 12},
                "ingredients": {
                    "type": "array",
                    "items": obj({"item": SHORT, "grams": {"type": "integer", "minimum": 1, "maximum": 999}}),
                    "minItems": 1,
                    "maxItems": 2,
                },
            }
        ),
    ),
    (
        "nickname",
        "Give a name and a nickname, if any.",
        obj({"name": NAME, "nickname": {"type": ["string", "null"], "maxLength": 12}}),
    ),
    (
        "either",
        "What is six times seven?",
        obj({"result": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, SHORT]}}),
    ),
    (
        "optional",
        "Name a city, and its country if you know it.",
        obj({"city": NAME, "country": SHORT}, required=["city"]),
    ),
    (
        "pets",
        "Describe two pets.",
        {
            "$defs": {"Pet": obj({"name": SHORT, "kind": {"enum": ["cat", "dog", "fish"]}})},
            **obj({"pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}, "minItems": 1, "maxItems": 2}}),
        },
    ),
    ("versioned", "Describe a config file.", obj({"version": {"const": 2}, "name": SHORT})),
    (
        "company",
        "Describe a small company.",
        obj(
            {
                "name": NAME,
                "ceo": obj({"name": NAME, "age": {"type": "integer", "minimum": 18, "maximum": 99}}),
                "staff": {"type": "integer", "minimum": 1, "maximum": 999},
            }
        ),
    ),
    (
        "matrix",
        "Give a 2 by 2 matrix of digits.",
        obj(
            {
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 0, "maximum": 9},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                    "minItems": 2,
                    "maxItems": 2,
                }
            }
        ),
    ),
    (
        "sentiment",
        "Classify: 'I love this phone.'",
        obj(
            {
                "label": {"enum": ["positive", "negative", "neutral"]},
                "score": {"type": "integer", "minimum": 0, "maximum": 10},
            }
        ),
    ),
    ("code", "Give a flight code.", obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}})),
    (
        "geo",
        "Where is Paris on the map?",
        obj(
            {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "minimum": -180, "maximum": 180},
            }
        ),
    ),
    ("count", "How many legs does a spider have?", {"type": "integer", "minimum": 0, "maximum": 100}),
    (
        "quote",
        "Give a short quote and who said it.",
        obj({"quote": {"type": "string", "minLength": 3, "maxLength": 30}, "by": NAME}),
    ),
]
