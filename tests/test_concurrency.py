"""Continuous batching: 16 clients at once get exactly their single-request answers; disconnects free slots."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import MODEL, wait_until

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about rain.",
    "What is 7 times 8?",
    "Say hello in Spanish.",
    "What is Python?",
    "Give me a fruit.",
    "Describe the sea in one sentence.",
    "What day comes after Monday?",
    "Tell me a fun fact.",
    "What is the opposite of hot?",
    "Count to four.",
    "What is a cat?",
    "Suggest a name for a dog.",
    "What color is the sky?",
    "Why do birds sing?",
]


async def _stream_text(client, prompt: str, max_tokens: int) -> str:  # type: ignore[no-untyped-def]
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_sixteen_parallel_streams_match_single_requests(client, server) -> None:
    singles = [await _stream_text(client, p, 24) for p in PROMPTS]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server.engine_stats().num_running)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    together = await asyncio.gather(*[_stream_text(client, p, 24) for p in PROMPTS])
    watcher.cancel()
    assert together == singles
    assert peak >= 8  # they really ran in one decode batch, not one after another


# a request that would run for 1000 tokens unless its client goes away
LONG_REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 1000,
    "ignore_eos": True,
}


async def test_disconnect_mid_stream_frees_the_slot(server) -> None:
    body = {**LONG_REQUEST, "stream": True}
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 5:
                    break
            assert server.engine_stats().num_running == 1
    # the connection is closed: the engine must drop the sequence long before 1000 tokens
    assert await wait_until(lambda: server.engine_stats().num_running == 0, timeout=10)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'turnout:request_success_total{finished_reason="abort",model_name="smollm2-135m"}' in metrics


async def test_disconnect_of_non_streaming_request_frees_the_slot(server) -> None:
    body = LONG_REQUEST
    async with httpx.AsyncClient(timeout=60) as http:
        task = asyncio.create_task(http.post(f"{server.url}/v1/chat/completions", json=body))
        assert await wait_until(lambda: server.engine_stats().num_running == 1, timeout=20)
        task.cancel()
    assert await wait_until(lambda: server.engine_stats().num_running == 0, timeout=10)
