"""engine/grammar.py and engine/json_schema.py without a model: compilation and its cache, the
keywords refused, the bitmask on a batch's rows, and draft verification that leaves the matcher
where it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.grammar import GrammarCompiler, GrammarError, GrammarMasker, GrammarSpec
from engine.json_schema import unsupported_keyword
from engine.tokenizer import Tokenizer

VOCAB = 49152


@pytest.fixture(scope="module")
def compiler(model_path: Path) -> GrammarCompiler:
    return GrammarCompiler(Tokenizer(model_path), VOCAB, capacity=2)


@pytest.mark.parametrize(
    ("schema", "found"),
    [
        ({"type": "array", "uniqueItems": True}, "#: 'uniqueItems'"),
        ({"properties": {"a": {"not": {"type": "string"}}}}, "#/properties/a: 'not'"),
        ({"items": {"if": {}, "then": {}}}, "#/items: 'if'"),
        ({"$defs": {"X": {"contains": {}}}}, "#/$defs/X: 'contains'"),
        ({"anyOf": [{}, {"dependentRequired": {}}]}, "#/anyOf/1: 'dependentRequired'"),
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "#: 'allOf'"),
        ({"type": "string", "pattern": "a{1,5000}"}, "#: 'pattern' repetition"),
        ({"type": "string", "pattern": "a{" + "9" * 5000 + "}"}, "#: 'pattern' repetition"),
    ],
)
def test_keywords_the_grammar_would_ignore_are_named(schema: dict[str, Any], found: str) -> None:
    problem = unsupported_keyword(schema)
    assert problem is not None and problem.startswith(found)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"not": {"type": "string"}, "if": {"enum": ["contains"]}}},  # names, values
        {"oneOf": [{"type": "integer"}, {"type": "string"}]},  # enforced as anyOf
        {"type": "string", "format": "iri"},  # an unknown format is an annotation
        {"allOf": [{"$ref": "#/$defs/A"}], "$defs": {"A": {"type": "integer"}}},  # one schema: pydantic writes these
        {"type": "array", "uniqueItems": False},
        True,
    ],
)
def test_what_the_grammar_enforces_passes(schema: Any) -> None:
    assert unsupported_keyword(schema) is None


def test_deep_nesting_is_refused_not_recursed_forever() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(100):
        schema = {"type": "array", "items": schema}
    assert "nested deeper" in (unsupported_keyword(schema) or "")


def test_compiled_grammars_are_cached_by_source_and_bounded(compiler: GrammarCompiler) -> None:
    a, b, c = (GrammarSpec.json_schema({"enum": [x]}) for x in "abc")
    first = compiler.compile(a)
    assert compiler.compile(GrammarSpec.json_schema({"enum": ["a"]})) is first  # same source: cached
    compiler.compile(b), compiler.compile(c)
    assert list(compiler._cache) == [b, c]  # the least recently used went
    assert GrammarSpec.json_schema({"b": 1, "a": 2}).source == '{"b":1,"a":2}'  # property order kept


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (GrammarSpec.json_schema({"type": "foo"}), 'Unsupported type "foo"'),
        (GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
        (GrammarSpec.structural_tag({"type": "structural_tag", "format": {"type": "nope"}}), ""),
    ],
)
def test_what_cannot_compile_is_a_grammar_error(compiler: GrammarCompiler, spec: GrammarSpec, words: str) -> None:
    with pytest.raises(GrammarError) as error:
        compiler.compile(spec)
    assert words in str(error.value) and "json_schema_converter.cc" not in str(error.value)


def test_loose_mode_builds_what_strict_mode_cannot(compiler: GrammarCompiler) -> None:
    compiler.compile(GrammarSpec.json_schema({"type": "array", "minItems": 2}))  # items undeclared


def _allowed(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(logits > float("-inf")).flatten().tolist())


def test_the_mask_limits_constrained_rows_and_leaves_the_others(compiler: GrammarCompiler) -> None:
    tok = compiler.tokenizer
    state = compiler.state(GrammarSpec.json_schema({"enum": ["yes", "no"]}))
    logits = torch.randn(3, VOCAB)
    free = logits[1].clone()
    argmax = GrammarMasker().mask([state, None, state], logits, [0, 7, 0], [True, False, True])
    assert argmax is not None and argmax[1] == 7 and torch.equal(logits[1], free)
    allowed = _allowed(logits[0])
    assert argmax[0] == int(logits[0].argmax()) and argmax[0] in allowed
    assert allowed == _allowed(logits[2]) and tok.encode('"')[0] in allowed and len(allowed) < 100
    assert all(tok.token_text(t).startswith('"') for t in allowed)


def test_a_greedy_row_whose_best_token_the_grammar_allows_is_left_as_it_is(compiler: GrammarCompiler) -> None:
    quote = compiler.tokenizer.encode('"')[0]
    state = compiler.state(GrammarSpec.json_schema({"enum": ["yes", "no"]}))
    logits = torch.randn(2, VOCAB)
    logits[0, quote] = logits[1, 5] = 100.0  # row 0's best is allowed; row 1's ("&") is not
    kept = logits[0].clone()
    argmax = GrammarMasker().mask([state, state], logits, None, [False, False])
    assert argmax is not None and argmax[0] == quote and torch.equal(logits[0], kept)  # no pass over row 0
    assert argmax[1] != 5 and torch.isinf(logits[1]).sum() > VOCAB - 100  # row 1 masked, its best re-taken
    assert compiler.tokenizer.token_text(argmax[1]).startswith('"')


def test_draft_verification_cuts_at_the_first_forbidden_draft_and_rolls_back(compiler: GrammarCompiler) -> None:
    tok = compiler.tokenizer
    state = compiler.state(GrammarSpec.json_schema({"enum": ["yes", "no"]}))
    good = tok.encode('"yes"')
    drafts = [*good[:2], tok.encode("x")[0], *good[2:]]
    logits = torch.randn(len(drafts) + 1, VOCAB)
    assert GrammarMasker().mask_drafts(state, drafts, logits) == good[:2]
    assert _allowed(logits[0]) >= {good[0]} and good[1] in _allowed(logits[1]) and good[2] in _allowed(logits[2])
    assert torch.isinf(logits[0]).sum() > VOCAB - 100  # masked: a handful of tokens left
    assert not torch.isinf(logits[3]).any()  # past the cut: untouched (never read)
    assert all(state.accept(t) for t in good)  # the matcher was where it started
    assert state.accept(next(iter(tok.stop_token_ids))) and state.terminated
