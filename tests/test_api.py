"""The official openai client against a live turnout server with the real SmolLM2 model."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL, streamed_text

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def test_models_lists_the_expert(client) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == 2048


async def test_chat_answers_with_usage_extension(client) -> None:
    r = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    usage = r.usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extra = usage.model_extra
    assert extra["cost_usd"] > 0
    assert extra["activated_params_per_token"] > 100_000_000
    assert extra["ttft_ms"] > 0 and extra["decode_ms"] >= 0 and extra["queue_ms"] >= 0
    assert extra["tokens_per_second"] > 0


async def test_length_finish_and_max_completion_tokens(client) -> None:
    r = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


async def test_completion_endpoint(client) -> None:
    r = await client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, user="tester"
    )
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert "Paris" in r.choices[0].text


async def test_completion_echo_and_token_prompt(client, server) -> None:
    text = await client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0, echo=True)
    assert text.choices[0].text.startswith("Hello there")
    engine = server.app.state.turnout.experts[MODEL].engine
    ids = engine.tokenize("Hello there")
    by_ids = await client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert text.choices[0].text == "Hello there" + by_ids.choices[0].text


async def test_streaming_chat_with_usage_chunk(client) -> None:
    full = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = streamed_text(chunks)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


async def test_streaming_completion_sends_tokens_incrementally(client) -> None:
    stream = await client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=12, temperature=0, stream=True
    )
    pieces = [c.choices[0].text async for c in stream if c.choices]
    assert len([p for p in pieces if p]) >= 6  # token by token, not one blob at the end


async def test_stop_string_across_token_boundary(client, server) -> None:
    base = await client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    text = base.choices[0].text
    engine = server.app.state.turnout.experts[MODEL].engine
    pieces = [engine.token_text(t) for t in engine.tokenize(text)]
    # a stop string made of the end of one token and the start of the next
    boundary = len(pieces[0]) + len(pieces[1])
    stop = text[boundary - 2 : boundary + 2]
    assert len(stop) == 4
    for stream in (False, True):
        r = await client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stop=[stop], stream=stream
        )
        if stream:
            chunks = [c async for c in r]
            got = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        else:
            got, reason = r.choices[0].text, r.choices[0].finish_reason
        assert got == text[: text.index(stop)]
        assert reason == "stop"


async def test_seeded_sampling_is_reproducible(client) -> None:
    async def run(seed: int) -> str:
        r = await client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=20, temperature=1.0, top_p=0.95, seed=seed
        )
        return r.choices[0].message.content

    a, b = await run(1234), await run(1234)
    assert a == b
    others = {await run(s) for s in range(5)}
    assert len(others) > 1  # sampling really samples


async def test_n_choices(client) -> None:
    r = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, n=3, seed=7
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 36  # every choice's tokens, each at most max_tokens
    assert len({c.message.content for c in r.choices}) > 1
    single = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, n=1)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is counted once


async def test_n_choices_streamed(client) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=8,
        temperature=1.0,
        n=2,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    finished = set()
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and all(texts.values())


@pytest.mark.parametrize("top", [0, 3])
async def test_chat_logprobs(client, top: int) -> None:
    r = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=top
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content[:3])
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == top
        if top:
            assert t.top_logprobs[0].logprob >= t.logprob - 1e-5  # greedy picks the most likely


async def test_completion_logprobs(client) -> None:
    r = await client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(d) <= 2 for d in lp.top_logprobs)


async def test_content_parts_are_accepted(client) -> None:
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]
    a = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0
    )
    b = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
