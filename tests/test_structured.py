"""Structured output (response_format) through the official openai client against the real SmolLM2:
every output of every project schema validates, batched with free requests, streamed and not,
greedy and sampled; parse() with a pydantic model; refusals are 400s naming the field; the
grammar holds under speculative decoding (identical greedy output) and R2R (both models' tokens)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

from engine.base import GenerationRequest, SamplingParams
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.factory import build_embedded, build_r2r
from engine.grammar import GrammarSpec
from server.config import ExpertConfig, Settings, SpeculativeSettings
from tests.conftest import MODEL, LiveServer
from tests.structured_schemas import SCHEMAS

BUDGET = 160  # max_tokens: every schema's answer fits (bounded strings, arrays and numbers)


def response_format(name: str, schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{prompt} Answer in JSON."}]


async def constrained(client, name: str, prompt: str, schema: Any, stream: bool, temperature: float, **extra: Any):  # type: ignore[no-untyped-def]
    """(content, finish_reason) of one request, streamed or not."""
    kwargs = dict(model=MODEL, messages=ask(prompt), max_tokens=BUDGET, temperature=temperature, seed=3) | extra
    kwargs["response_format"] = response_format(name, schema)
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices and c.choices[0].finish_reason)


def assert_valid(text: str, schema: Any, finish: str | None, name: str) -> None:
    assert finish == "stop", f"{name}: finished {finish} with {text!r}"
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.slow
async def test_every_schema_validates_streamed_and_not_greedy_and_sampled_batched_with_free_requests(client) -> None:  # type: ignore[no-untyped-def]
    jobs, checks = [], []
    for i, (name, prompt, schema) in enumerate(SCHEMAS):  # each schema one way; the ways in turn
        stream, temperature = i % 2 == 1, (0.0, 0.8)[i // 2 % 2]
        jobs.append(constrained(client, name, prompt, schema, stream, temperature))
        checks.append((name, schema))
    free = [
        client.chat.completions.create(model=MODEL, messages=ask(p), max_tokens=24, temperature=0)
        for _, p, _ in SCHEMAS[:4]
    ]
    room = asyncio.Semaphore(24)  # a full batch of 16 and some waiting: under the queue's limit of 32

    async def held(job):  # type: ignore[no-untyped-def]
        async with room:
            return await job

    # batched: constrained and unconstrained rows decode together
    results = await asyncio.gather(*(held(j) for j in [*free[:2], *jobs, *free[2:]]))
    results = results[2:-2] + results[:2] + results[-2:]
    for (name, schema), (text, finish) in zip(checks, results[: len(jobs)]):
        assert_valid(text, schema, finish, name)
    for r in results[len(jobs) :]:
        assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


async def test_json_object_answers_an_object(client) -> None:  # type: ignore[no-untyped-def]
    r = await client.chat.completions.create(
        model=MODEL,
        messages=ask("Describe a cat in three short fields."),
        response_format={"type": "json_object"},
        max_tokens=BUDGET,
        temperature=0,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut at max_tokens: unfinished JSON, but an object so far
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


async def test_text_response_format_is_free_text(client) -> None:  # type: ignore[no-untyped-def]
    kwargs: dict[str, Any] = dict(model=MODEL, messages=ask("What is 2 + 2?"), max_tokens=12, temperature=0)
    plain = await client.chat.completions.create(**kwargs)
    text = await client.chat.completions.create(**kwargs, response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    kind: str = pydantic.Field(pattern="^(cat|dog|fish)$")
    age: int = pydantic.Field(ge=0, le=30)


def test_parse_with_a_pydantic_model(sync_client) -> None:  # type: ignore[no-untyped-def]
    for parse in (sync_client.chat.completions.parse, sync_client.beta.chat.completions.parse):
        r = parse(model=MODEL, messages=ask("Describe a pet."), response_format=Pet, max_tokens=BUDGET, temperature=0)
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet) and pet.kind in ("cat", "dog", "fish") and 0 <= pet.age <= 30


async def test_n_2_gives_two_valid_answers(client) -> None:  # type: ignore[no-untyped-def]
    name, prompt, schema = SCHEMAS[0]
    r = await client.chat.completions.create(
        model=MODEL,
        messages=ask(prompt),
        response_format=response_format(name, schema),
        n=2,
        max_tokens=BUDGET,
        temperature=1.0,
        seed=11,
    )
    assert len(r.choices) == 2
    for choice in r.choices:
        assert_valid(choice.message.content, schema, choice.finish_reason, name)


async def test_stop_strings_and_max_tokens_cut_the_json_short(client) -> None:  # type: ignore[no-untyped-def]
    name, prompt, schema = SCHEMAS[1]  # weather: an object of three fields
    whole, _ = await constrained(client, name, prompt, schema, False, 0.0)
    stopped, finish = await constrained(client, name, prompt, schema, True, 0.0, stop=[","])
    assert finish == "stop" and stopped == whole[: whole.index(",")]
    short, finish = await constrained(client, name, prompt, schema, False, 0.0, max_tokens=4)
    assert finish == "length" and whole.startswith(short)
    with pytest.raises(json.JSONDecodeError):
        json.loads(short)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"response_format": response_format("bad", {"type": "foo"})}, "response_format", "foo"),
        (
            {"response_format": response_format("bad", {"type": "array", "uniqueItems": True})},
            "response_format",
            "uniqueItems",
        ),
        ({"response_format": response_format("bad", {"not": {"type": "string"}})}, "response_format", "'not'"),
        ({"response_format": response_format("bad", {"$ref": "#/$defs/Missing"})}, "response_format", "$defs"),
        (
            {"response_format": response_format("bad", {"type": "integer", "minimum": 5, "maximum": 1})},
            "response_format",
            "range",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"response_format": response_format("bad name!", {})}, "response_format.json_schema.name", "pattern"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "response_format"),
    ],
)
def test_what_cannot_be_enforced_is_a_400_naming_the_field(
    sync_client, body: dict[str, Any], param: str, words: str
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as refused:
        sync_client.chat.completions.create(model=MODEL, messages=ask("Hi."), max_tokens=4, extra_body=body)
    error = refused.value.body
    assert error["param"] == param and words in error["message"], error  # type: ignore[index]


# --- speculative decoding and R2R ------------------------------------------------------------


@pytest.fixture(scope="module")
def speculating(model_path: Path) -> Iterator[LiveServer]:
    expert = ExpertConfig(
        name="spec",
        model=str(model_path),
        dtype="float32",
        max_model_len=1024,
        speculative=SpeculativeSettings(draft="ngram"),
    )
    live = LiveServer(Settings(experts=[expert]))
    live.start()
    yield live
    live.stop()


@pytest.mark.slow
def test_speculation_keeps_the_constrained_greedy_output(sync_client, speculating: LiveServer) -> None:  # type: ignore[no-untyped-def]
    spec = openai.OpenAI(base_url=f"{speculating.url}/v1", api_key="unused", max_retries=0, timeout=120)
    drafted = 0
    for name, prompt, schema in (SCHEMAS[4], SCHEMAS[16]):  # nested objects; $defs and an array
        # the schema in the prompt: its keys are what the n-gram drafter proposes
        messages = ask(f"{prompt} The schema: {json.dumps(schema)}")
        kwargs: dict[str, Any] = dict(
            messages=messages, response_format=response_format(name, schema), max_tokens=BUDGET, temperature=0
        )
        plain = sync_client.chat.completions.create(model=MODEL, **kwargs)
        both = spec.chat.completions.create(model="spec", **kwargs)
        assert both.choices[0].message.content == plain.choices[0].message.content
        assert_valid(both.choices[0].message.content, schema, both.choices[0].finish_reason, name)
        drafted += both.usage.model_extra["spec_accepted_tokens"]  # type: ignore[union-attr]
    assert drafted > 0  # drafts were verified under the grammar, and some stood


SMALL, LARGE = "smollm2-small", "smollm2-135m-instruct"


async def _texts(engine: EmbeddedEngine, prompt: list[int], params: list[SamplingParams]) -> list[tuple[str, Any]]:
    """Each request's text and final stats, all at once (one batch)."""

    async def one(i: int, p: SamplingParams) -> tuple[str, Any]:
        text, stats = "", None
        async for out in engine.generate(GenerationRequest(f"g{i}", prompt, p)):
            text, stats = text + out.text, out.stats or stats
        return text, stats

    await engine.start()
    try:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(params))))
    finally:
        await engine.stop()


@pytest.mark.slow
async def test_r2r_tokens_of_both_models_keep_to_the_grammar(random_router: Path) -> None:
    name, prompt, schema = SCHEMAS[6]  # book: strings, a bounded integer, an array of enums
    grammar = GrammarSpec.json_schema(schema)
    r2r = build_r2r(SMALL, LARGE, random_router, None, "float32", EmbeddedConfig(4, 512))
    ids = r2r.tokenize_chat(ask(prompt))
    params = [
        SamplingParams(max_tokens=BUDGET, temperature=0, grammar=grammar, r2r_threshold=t) for t in (0.0, 1.0, 0.5)
    ]
    large, small, mixed = await _texts(r2r, ids, params)
    expected = [
        await _texts(build_embedded(m, "float32", EmbeddedConfig(1, 512)), ids, params[:1]) for m in (LARGE, SMALL)
    ]
    assert large[0] == expected[0][0][0] and small[0] == expected[1][0][0]  # each model alone, masked
    for text, _ in (large, small, mixed):
        jsonschema.validate(json.loads(text), schema)
    assert mixed[1].r2r.small_tokens > 0 and mixed[1].r2r.large_tokens > 0  # both wrote, under one grammar
