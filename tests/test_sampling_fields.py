"""logit_bias, presence/frequency penalties, repetition_penalty and min_p: the arithmetic on
logits, end to end through the official client, and unchanged greedy output with speculative
decoding and R2R."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from safetensors.torch import save_file

from engine.base import GenerationRequest, SamplingParams, TextPrompt
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.factory import build_embedded, build_r2r
from engine.logits import LogitAdjuster, apply_min_p, penalize
from engine.r2r import TokenRouter
from engine.sampler import filter_logits
from engine.speculative.speculator import SpeculativeConfig
from tests.conftest import MODEL, started

CAPITAL = "The capital of France is"
REPEAT = "Say it again and again: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat,"


def _params(**kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=8, temperature=0, **kwargs)


# -- the arithmetic -----------------------------------------------------------------------------
def test_frequency_and_presence_penalties_subtract_count_times_frequency_plus_presence() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0]])
    params = _params(frequency_penalty=0.5, presence_penalty=0.25)
    adjuster = LogitAdjuster(params, num_prompt=1)
    adjuster.apply(logits, [0, 1, 1, 2])  # prompt [0]; generated 1 twice, 2 once
    # token 0 is only in the prompt: OpenAI's penalties count generated tokens
    assert logits.tolist() == [[1.0, 2.0 - 0.5 * 2 - 0.25, -1.0 - 0.5 - 0.25, 0.5, 3.0]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_every_token_seen() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, -3.0]])
    adjuster = LogitAdjuster(_params(repetition_penalty=2.0), num_prompt=2)
    adjuster.apply(logits, [0, 2, 1])  # prompt tokens count too
    assert logits.tolist() == [[0.5, 1.0, -2.0, 0.5, -3.0]]


def test_penalties_follow_vllms_order_repetition_then_frequency_then_presence() -> None:
    logits = torch.tensor([[4.0, -2.0]])
    counts, seen = torch.tensor([[2.0, 0.0]]), torch.tensor([[True, True]])
    params = _params(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    assert penalize(logits, counts, seen, params).tolist() == [[4.0 / 2 - 2.0 - 0.5, -4.0]]


def test_logit_bias_is_added_first_and_bans_or_forces() -> None:
    logits = torch.tensor([[1.0, 5.0, 2.0]])
    LogitAdjuster(_params(logit_bias=((1, -100.0), (2, 0.5))), 0).apply(logits, [])
    assert logits.tolist() == [[1.0, -95.0, 2.5]]
    assert int(logits.argmax()) == 2


def test_counts_catch_up_incrementally_and_drafts_count_as_generated_row_by_row() -> None:
    params = _params(frequency_penalty=0.7, presence_penalty=0.3, repetition_penalty=1.3, logit_bias=((4, 1.0),))
    torch.manual_seed(0)
    raw = torch.randn(3, 16)
    tokens, drafts = [5, 6, 7, 3], [3, 9]
    incremental = LogitAdjuster(params, num_prompt=2)
    incremental.apply(raw[:1].clone(), tokens[:3])  # an earlier step saw fewer tokens
    rows = raw.clone()
    incremental.apply(rows, tokens, drafts)
    for i in range(3):  # each row as if its drafts had been generated, by a fresh adjuster
        want = raw[i : i + 1].clone()
        LogitAdjuster(params, num_prompt=2).apply(want, tokens + drafts[:i])
        assert torch.equal(rows[i : i + 1], want)


def test_min_p_drops_tokens_below_min_p_times_the_top_probability() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = apply_min_p(probs.log(), 0.3).isfinite()
    assert kept.tolist() == [True, True, True, False]  # 0.05 < 0.3 * 0.5 <= 0.15
    params = SamplingParams(max_tokens=1, temperature=2.0, min_p=1.0)
    assert filter_logits(probs.log(), params).isfinite().tolist() == [True, False, False, False]
    assert torch.equal(apply_min_p(probs.log(), 0.0), probs.log())


def test_sampling_params_reject_bad_values() -> None:
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=1, repetition_penalty=0.0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=1, min_p=1.5)


# -- through the API ------------------------------------------------------------------------------
def _first_token(sync_client: Any, **extra: Any) -> tuple[str, Any]:
    r = sync_client.completions.create(model=MODEL, prompt=CAPITAL, max_tokens=3, temperature=0, logprobs=0, **extra)
    return r.choices[0].logprobs.tokens[0], r


def _token_id(server: Any, text: str) -> int:
    ids = server.app.state.turnout.experts[MODEL].engine.tokenizer.encode(text)
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


def test_logit_bias_bans_the_greedy_first_token_and_forces_another(server, sync_client) -> None:  # type: ignore[no-untyped-def]
    first, _ = _first_token(sync_client)
    banned = _token_id(server, first)
    other, _ = _first_token(sync_client, logit_bias={str(banned): -100})
    assert other != first
    forced = _token_id(server, " banana")
    got, r = _first_token(sync_client, logit_bias={str(forced): 100})
    assert got == " banana" and r.choices[0].text.startswith(" banana banana")
    chat = sync_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0, logit_bias={forced: 100}
    )
    assert chat.choices[0].message.content == " banana banana"


@pytest.mark.parametrize("bias", [{"49152": 1}, {"-1": 1}, {"cat": 1}, {"5": 101}, {"5": -100.5}])
def test_bad_logit_bias_is_a_400_naming_it(server, bias: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "logit_bias": bias}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias"


def _repeats(sync_client: Any, **extra: Any) -> tuple[int, list[str]]:
    r = sync_client.completions.create(model=MODEL, prompt=REPEAT, max_tokens=24, temperature=0, logprobs=0, **extra)
    tokens = r.choices[0].logprobs.tokens
    return len(tokens) - len(set(tokens)), tokens


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty", "repetition_penalty"])
def test_penalties_make_a_repetitive_continuation_repeat_fewer_tokens(sync_client, field: str) -> None:  # type: ignore[no-untyped-def]
    plain, plain_tokens = _repeats(sync_client)
    value = 1.8 if field == "repetition_penalty" else 2.0
    penalized, tokens = _repeats(sync_client, extra_body={field: value})
    assert plain >= 8, plain_tokens  # the prompt does make the model repeat itself
    assert penalized < plain / 2, (plain_tokens, tokens)


def test_min_p_of_one_is_the_greedy_choice_at_any_temperature(sync_client) -> None:  # type: ignore[no-untyped-def]
    greedy = sync_client.completions.create(model=MODEL, prompt=CAPITAL, max_tokens=12, temperature=0)
    hot = sync_client.completions.create(
        model=MODEL, prompt=CAPITAL, max_tokens=12, temperature=1.8, seed=3, extra_body={"min_p": 1.0}
    )
    assert hot.choices[0].text == greedy.choices[0].text


@pytest.mark.parametrize("extra", [{"min_p": 1.5}, {"repetition_penalty": 0}, {"presence_penalty": 3}])
def test_out_of_range_values_are_400s_naming_the_field(sync_client, extra: dict[str, float]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        sync_client.completions.create(model=MODEL, prompt="hi", max_tokens=1, extra_body=extra)
    assert info.value.body["param"] == next(iter(extra))


def test_remote_experts_pass_the_fields_to_the_upstream() -> None:
    from engine.remote import RemoteConfig, RemoteEngine

    engine = RemoteEngine(RemoteConfig(base_url="http://upstream/v1", model="m"))
    params = SamplingParams(
        max_tokens=4, logit_bias=((7, -100.0), (9, 2.5)), presence_penalty=0.5, repetition_penalty=1.2, min_p=0.1
    )
    _, body = engine._body(GenerationRequest("r", TextPrompt("hi"), params))
    assert body["logit_bias"] == {"7": -100, "9": 2.5}
    assert (body["presence_penalty"], body["repetition_penalty"], body["min_p"]) == (0.5, 1.2, 0.1)
    assert "frequency_penalty" not in body  # unset fields are the upstream's defaults
    _, plain = engine._body(GenerationRequest("r", TextPrompt("hi"), SamplingParams(max_tokens=4)))
    assert not {"logit_bias", "presence_penalty", "repetition_penalty", "min_p"} & set(plain)


# -- speculative decoding and R2R: the same adjusted distribution ----------------------------------
@pytest.fixture(scope="module")
def engines(model_path: Path):  # type: ignore[no-untyped-def]
    def make(spec: SpeculativeConfig | None) -> EmbeddedEngine:
        return build_embedded(str(model_path), "float32", EmbeddedConfig(4, 512, speculative=spec))

    yield from started(make(None), make(SpeculativeConfig("ngram", num_draft_tokens=4, max_batch_size=4)))


async def _generate(engine: EmbeddedEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], Any]:
    tokens, last = [], None
    async for out in engine.generate(GenerationRequest(f"r{id(params)}", prompt, params)):
        tokens += out.token_ids
        last = out
    assert last is not None
    return tokens, last.stats


ADJUSTED = {
    "frequency": {"frequency_penalty": 0.6},
    "presence and bias": {"presence_penalty": 1.0, "bias": 3.0},
    "repetition": {"repetition_penalty": 1.3},
    "all": {"frequency_penalty": -0.5, "presence_penalty": 0.5, "repetition_penalty": 1.1, "bias": -100.0},
}


@pytest.mark.parametrize("name", list(ADJUSTED))
def test_greedy_output_with_penalties_is_identical_with_speculation(engines, name: str) -> None:  # type: ignore[no-untyped-def]
    plain, spec, loop = engines
    prompt = plain.tokenize(REPEAT)
    unadjusted = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    base, _ = loop.run_until_complete(_generate(plain, prompt, unadjusted))
    adjust = dict(ADJUSTED[name])
    if "bias" in adjust:  # on the token the model repeats most
        adjust["logit_bias"] = ((max(set(base), key=base.count), adjust.pop("bias")),)
    params = replace(unadjusted, **adjust)
    want, _ = loop.run_until_complete(_generate(plain, prompt, params))
    got, stats = loop.run_until_complete(_generate(spec, prompt, params))
    assert want != base  # the adjustment did change the output
    assert got == want
    # drafts were verified against the adjusted rows (a repetition penalty steers the output off
    # every token seen, the prompt's included, so prompt lookup finds nothing to draft)
    assert stats.speculation.steps > 0 or name == "repetition"


def test_seeded_sampling_with_penalties_and_min_p_is_reproducible_with_speculation(engines) -> None:  # type: ignore[no-untyped-def]
    _, spec, loop = engines
    prompt = spec.tokenize(REPEAT)
    params = SamplingParams(max_tokens=24, temperature=0.9, seed=11, min_p=0.05, frequency_penalty=0.5)
    first, _ = loop.run_until_complete(_generate(spec, prompt, params))
    again, _ = loop.run_until_complete(_generate(spec, prompt, params))
    assert first == again


def test_r2r_rewrites_from_the_large_models_adjusted_distribution(engines, model_path: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plain, _, loop = engines
    torch.manual_seed(0)
    router = TokenRouter(576)
    save_file({k: v.contiguous() for k, v in router.state_dict().items()}, str(tmp_path / "router.safetensors"))
    (tmp_path / "router.json").write_text(json.dumps({"dim": 576, "threshold": 0.5}))
    r2r = build_r2r("smollm2-small", str(model_path), tmp_path, None, "float32", EmbeddedConfig(2, 256))
    prompt = plain.tokenize(REPEAT)
    # threshold 0: the large model writes every token, so the output is the plain large model's
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, frequency_penalty=1.0, r2r_threshold=0.0)
    want, _ = loop.run_until_complete(_generate(plain, prompt, params))
    loop.run_until_complete(r2r.start())
    try:
        got, stats = loop.run_until_complete(_generate(r2r, prompt, params))
    finally:
        loop.run_until_complete(r2r.stop())
    assert stats.r2r.large_tokens == 16 and got == want
