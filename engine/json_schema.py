"""JSON Schema keywords xgrammar accepts but does not enforce: a schema using one is refused, since
an output that ignores part of its schema is worse than an error that says so.

Found by compiling a schema with each keyword and feeding the grammar an instance that violates
it (xgrammar 0.2): ``not``, ``if``/``then``/``else``, ``contains`` (and its min/max),
``dependentRequired``, ``dependentSchemas``, ``dependencies``, ``uniqueItems: true`` and an
``allOf`` of more than one schema pass unchecked. ``oneOf`` is enforced as ``anyOf`` (an output
matches at least one branch; exclusivity is not checked) and ``format`` values xgrammar does not
know (``idn-email``, ``iri``, ``regex``, ...) are annotations, as JSON Schema 2020-12 has them.
"""

from __future__ import annotations

import re
from typing import Any

NOT_ENFORCED = (
    "not",
    "if",
    "then",
    "else",
    "contains",
    "minContains",
    "maxContains",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "$dynamicRef",
    "$recursiveRef",
)
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> schema
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_VALUES = ("additionalProperties", "items", "propertyNames", "unevaluatedProperties", "unevaluatedItems")
MAX_DEPTH = 64
MAX_REPEAT = 1000  # a regex counted repetition past this takes the compiler seconds per thousand
_COUNTED = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def unsupported_keyword(schema: Any, where: str = "#", depth: int = 0) -> str | None:
    """The first thing in ``schema`` the grammar could not enforce, as ``"#/properties/x: why"``;
    None when every keyword it uses is enforced."""
    if not isinstance(schema, dict):
        return None
    if depth > MAX_DEPTH:
        return f"{where}: schemas nested deeper than {MAX_DEPTH} levels are not supported"
    if problem := _own_problem(schema):
        return f"{where}: {problem}"
    for key in SCHEMA_MAPS:
        if isinstance(children := schema.get(key), dict):
            for name, child in children.items():
                if found := unsupported_keyword(child, f"{where}/{key}/{name}", depth + 1):
                    return found
    for key in SCHEMA_LISTS:
        if isinstance(children := schema.get(key), list):
            for i, child in enumerate(children):
                if found := unsupported_keyword(child, f"{where}/{key}/{i}", depth + 1):
                    return found
    for key in SCHEMA_VALUES:
        if found := unsupported_keyword(schema.get(key), f"{where}/{key}", depth + 1):
            return found
    return None


def _own_problem(schema: dict[str, Any]) -> str | None:
    for key in NOT_ENFORCED:
        if key in schema:
            return f"'{key}' is not supported by structured output (it could not be enforced)"
    if schema.get("uniqueItems") is True:
        return "'uniqueItems' is not supported by structured output (it could not be enforced)"
    if isinstance(all_of := schema.get("allOf"), list) and len(all_of) > 1:
        return "'allOf' with more than one schema is not supported by structured output (merge them)"
    if isinstance(pattern := schema.get("pattern"), str):
        for low, high in _COUNTED.findall(pattern):
            if max(len(low), len(high)) > len(str(MAX_REPEAT)) or max(int(low), int(high or 0)) > MAX_REPEAT:
                return f"'pattern' repetition counts above {MAX_REPEAT} are not supported"
    return None
