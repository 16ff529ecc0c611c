"""The CoE router offline: features, decisions, fallbacks, the shipped head and the map proposal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.zoo import ASSETS
from router.coe import CATEGORIES
from router.coe.classifier import load
from router.coe.data import DATA, load_examples
from router.coe.embedder import DIM, SentenceEmbedder
from router.coe.features import (
    CONTEXT_BINS,
    FEATURES,
    LAST,
    LEXICAL_BINS,
    conversation_features,
    hashed,
    ngrams,
    split_turns,
)
from router.coe.propose import (
    ExpertScores,
    Floor,
    ThresholdPoint,
    propose_map,
    quality_first,
    r2r_threshold_choice,
    scores_from_results,
)
from router.coe.router import CoEConfig, CoERouter
from router.coe.train import confusion, featurize, report

CLASSIFIER = ASSETS / "coe"
ROOT = Path(__file__).resolve().parent.parent
MAP = {"math": "m", "code": "c", "knowledge": "k", "writing": "w", "summarize": "s", "chat": "h"}
CODE_CHAT = [
    {"role": "user", "content": "Write a Python function that checks whether a string is a palindrome."},
    {"role": "assistant", "content": "def is_palindrome(s):\n    return s == s[::-1]"},
    {"role": "user", "content": "Now make it ignore spaces and punctuation, and add a unit test."},
]


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder()


@pytest.fixture(scope="module")
def router(embedder: SentenceEmbedder) -> CoERouter:
    return CoERouter.load(CLASSIFIER, CoEConfig(MAP, fallback="f"), embedder)


def test_the_latest_user_turn_is_split_from_the_rest_of_the_conversation() -> None:
    last, context = split_turns([{"role": "system", "content": "Be brief."}, *CODE_CHAT])
    assert last == CODE_CHAT[2]["content"]
    assert context == ["Be brief.", CODE_CHAT[0]["content"], CODE_CHAT[1]["content"]]
    assert split_turns([{"role": "assistant", "content": "hi"}]) == ("hi", [])


def test_features_hold_the_last_turn_the_mean_of_the_others_and_a_history_flag(embedder: SentenceEmbedder) -> None:
    single = [{"role": "user", "content": "What is the boiling point of water?"}]
    features = conversation_features(embedder, [single, CODE_CHAT])
    assert features.shape == (2, FEATURES)
    vectors = embedder.embed([m["content"] for m in CODE_CHAT])
    torch.testing.assert_close(features[1, :DIM], vectors[2])
    torch.testing.assert_close(
        features[1, DIM : DIM + LEXICAL_BINS], hashed(CODE_CHAT[2]["content"], LEXICAL_BINS, True)
    )
    torch.testing.assert_close(features[1, LAST : LAST + DIM], vectors[:2].mean(0))
    assert features[1, LAST + DIM] == 1  # the history flag
    torch.testing.assert_close(
        features[1, LAST + DIM + 1 :], hashed(" ".join(m["content"] for m in CODE_CHAT[:2]), CONTEXT_BINS, False)
    )
    assert features[0, LAST:].abs().sum() == 0  # no history: the context half is empty


def test_lexical_features_count_hashed_ngrams_at_unit_length() -> None:
    assert set(ngrams("TL;DR this", characters=False)) == {
        "w:tl",
        "w:;",
        "w:dr",
        "w:this",
        "b:tl ;",
        "b:; dr",
        "b:dr this",
    }
    assert "c:<def" in ngrams("def add", characters=True) and "o:def" in ngrams("def add", characters=True)
    vector = hashed("write a poem, a short poem", 64, characters=False)
    assert float(vector.norm()) == pytest.approx(1.0) and int((vector > 0).sum()) <= 11  # 5 words, 6 bigrams
    assert float(hashed("", 64, characters=True).abs().sum()) == 0


def test_cached_embeddings_equal_fresh_ones_and_are_not_recomputed(embedder: SentenceEmbedder) -> None:
    text = "A sentence that the cache test embeds twice."
    first = embedder.embed([text])
    calls = []
    compute = embedder._compute
    embedder._compute = lambda texts: calls.append(texts) or compute(texts)  # type: ignore[method-assign]
    try:
        again = embedder.embed([text, "and one new sentence"])
    finally:
        embedder._compute = compute  # type: ignore[method-assign]
    assert calls == [["and one new sentence"]]
    torch.testing.assert_close(again[0], first[0])
    torch.testing.assert_close(first[0], compute([text])[0])


def test_decisions_are_deterministic_and_match_the_batch_path(router: CoERouter) -> None:
    first, second = router.route(CODE_CHAT), router.route(CODE_CHAT)
    assert (first.category, first.confidence, first.expert) == (second.category, second.confidence, second.expert)
    probs = router.probabilities([CODE_CHAT, [{"role": "user", "content": "Tell me a joke"}]])
    assert CATEGORIES[int(probs[0].argmax())] == first.category
    assert abs(float(probs[0].max()) - first.confidence) < 1e-6
    assert first.category == "code" and first.expert == "c" and first.reason == "category"


def test_low_confidence_unhealthy_and_unmapped_go_to_the_fallback(embedder: SentenceEmbedder) -> None:
    head = load(CLASSIFIER)
    unsure = CoERouter(embedder, head, CoEConfig(MAP, fallback="f", min_margin=1.0))  # no margin reaches 1
    assert (unsure.route(CODE_CHAT).expert, unsure.route(CODE_CHAT).reason) == ("f", "low_confidence")
    confident = CoERouter(embedder, head, CoEConfig(MAP, fallback="f", min_confidence=0.0))
    sick = confident.route(CODE_CHAT, healthy=lambda name: name != "c")
    assert (sick.category, sick.expert, sick.reason) == ("code", "f", "unhealthy")
    partial = CoERouter(embedder, head, CoEConfig({"math": "m"}, fallback="f"))
    assert (partial.route(CODE_CHAT).expert, partial.route(CODE_CHAT).reason) == ("f", "unmapped")


def test_a_config_naming_an_unknown_category_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown categories"):
        CoEConfig({"poetry": "x"}, fallback="f")
    with pytest.raises(ValueError):
        CoEConfig({}, fallback="f", min_confidence=1.5)


def test_the_shipped_head_scores_what_its_metadata_says_on_the_held_out_split(embedder: SentenceEmbedder) -> None:
    meta = json.loads((CLASSIFIER / "head.json").read_text())
    test = [e for e in load_examples(DATA / "prompts.jsonl") if e.split == "test"]
    assert len(test) == meta["test_examples"] and len(test) >= 20 * len(CATEGORIES)
    labels = torch.tensor([e.label for e in test])
    result = report(confusion(load(CLASSIFIER), featurize(embedder, test, "held-out"), labels))
    assert result["accuracy"] == pytest.approx(meta["held_out"]["accuracy"], abs=0.01)
    assert result["accuracy"] > 0.75  # six balanced classes: chance is 0.17


def test_the_prompt_set_has_sixty_training_prompts_per_category_and_a_held_out_split() -> None:
    examples = load_examples(DATA / "prompts.jsonl")
    for category in CATEGORIES:
        train = [e for e in examples if e.category == category and e.split == "train"]
        test = [e for e in examples if e.category == category and e.split == "test"]
        assert len(train) >= 60 and len(test) >= 15
        assert any(len(e.messages) > 1 for e in train)
    assert len({e.id for e in examples}) == len(examples)


def scores(name: str, cost: float, accuracy: float | dict[str, float], bits: float | None = None) -> ExpertScores:
    acc = accuracy if isinstance(accuracy, dict) else {c: accuracy for c in CATEGORIES}
    return ExpertScores(name, cost, acc, {} if bits is None else {c: bits for c in CATEGORIES})


def test_a_cheaper_expert_serves_a_category_only_within_the_floor_of_the_best() -> None:
    best = scores("best", 3.0, 0.60, bits=1.00)
    close = scores("close", 2.0, 0.585, bits=1.04)  # 1.5 points and 4% worse: within the floor
    far = scores("far", 1.0, 0.57, bits=1.00)  # 3 points worse: below it
    assert set(quality_first([best, close, far], Floor()).values()) == {"close"}
    blurry = scores("blurry", 2.0, 0.60, bits=1.06)  # as accurate, but 6% more bits per byte
    assert set(quality_first([best, blurry], Floor()).values()) == {"best"}
    unscored = scores("unscored", 2.0, 0.59)  # no bits per byte (an r2r or remote expert): accuracy alone
    assert set(quality_first([best, unscored], Floor()).values()) == {"unscored"}
    assert set(quality_first([best, close], Floor(accuracy_points=0.01)).values()) == {"best"}
    # the bits-per-byte floor is measured from the best expert's own bits, not the lowest anyone has
    terse = scores("terse", 1.0, 0.60, bits=1.2)  # the most accurate and the cheapest
    wordy = scores("wordy", 2.0, 0.59, bits=1.0)
    assert set(quality_first([terse, wordy], Floor()).values()) == {"terse"}
    assert set(quality_first([terse, scores("weak", 2.0, 0.30, bits=1.0)], Floor()).values()) == {"terse"}


def test_each_category_gets_its_own_best_and_an_expert_worse_everywhere_is_never_mapped() -> None:
    maths = {c: 0.9 if c == "math" else 0.3 for c in CATEGORIES}
    words = {c: 0.2 if c == "math" else 0.6 for c in CATEGORIES}
    worse = scores("worse", 0.5, 0.1)  # the cheapest by far
    body = propose_map([scores("maths", 5.0, maths), scores("words", 1.0, words), worse])
    assert body["categories"] == {c: "maths" if c == "math" else "words" for c in CATEGORIES}
    assert "worse" not in body["categories"].values() and body["fallback"] == "words"
    assert body["mean_accuracy"] == pytest.approx((0.9 + 5 * 0.6) / 6)
    assert body["mean_activated_params_per_token"] == round((5.0 + 5 * 1.0) / 6)


def test_a_category_leaves_the_best_expert_overall_only_for_a_lead_clear_of_the_noise() -> None:
    def judged(name: str, cost: float, right: dict[str, int]) -> ExpertScores:
        outcomes = {c: [i < right.get(c, 10) for i in range(20)] for c in CATEGORIES}  # 20 items each
        return ExpertScores(name, cost, {c: sum(o) / 20 for c, o in outcomes.items()}, {}, outcomes)

    overall = judged("overall", 1.0, {})
    lucky = judged("lucky", 2.0, {"math": 11, "code": 5})  # one item ahead in math: noise
    strong = judged("strong", 2.0, {"math": 19, "code": 5})  # nine items ahead: clear
    assert set(propose_map([overall, lucky])["categories"].values()) == {"overall"}
    mapping = propose_map([overall, strong])["categories"]
    assert mapping["math"] == "strong" and {mapping[c] for c in CATEGORIES if c != "math"} == {"overall"}
    exact = propose_map([overall, lucky], Floor(noise_z=0.0))["categories"]  # taken at face value
    assert exact["math"] == "lucky"


def test_a_cost_budget_trades_quality_for_cost_and_reports_what_it_gives_up() -> None:
    dear = scores("dear", 3.0, {c: 0.8 if c in ("math", "code") else 0.5 for c in CATEGORIES})
    cheap = scores("cheap", 1.0, 0.4)
    assert set(propose_map([dear, cheap])["categories"].values()) == {"dear"}
    body = propose_map([dear, cheap], cost_budget=10 / 18)  # room for two dear categories of six
    assert body["categories"] == {c: "dear" if c in ("math", "code") else "cheap" for c in CATEGORIES}
    assert body["accuracy_given_up"] == {c: 0.0 if c in ("math", "code") else pytest.approx(0.1) for c in CATEGORIES}
    assert body["mean_accuracy_given_up"] == round(0.4 / 6, 4)
    with pytest.raises(ValueError, match="no map fits"):
        propose_map([dear, cheap], cost_budget=0.1)


def test_r2r_takes_the_fewest_large_tokens_that_answer_as_well_as_the_large_model() -> None:
    points = [ThresholdPoint(0.9, 0.30, 0.2), ThresholdPoint(0.3, 0.49, 0.6), ThresholdPoint(0.05, 0.50, 0.8)]
    assert r2r_threshold_choice(points, large_accuracy=0.50, floor_points=0.02)["threshold"] == 0.3
    fallback = r2r_threshold_choice(points, large_accuracy=0.70, floor_points=0.02)
    assert fallback["threshold"] == 0.05 and "no threshold" in fallback["reason"]


def test_the_shipped_map_is_what_the_shipped_benchmark_scores_propose() -> None:
    results = json.loads((ROOT / "benchmarks" / "results" / "routing_quality.json").read_text())
    shipped = json.loads((CLASSIFIER / "map.json").read_text())
    floor = Floor(**shipped["floor"])
    proposed = propose_map(scores_from_results(results, "dev"), floor)
    assert shipped["categories"] == proposed["categories"] and shipped["fallback"] == proposed["fallback"]
    assert set(shipped["categories"].values()) <= set(results["systems"])


def test_the_classifier_refuses_a_head_trained_for_other_categories(tmp_path: Path) -> None:
    for f in ("head.safetensors", "head.json"):
        (tmp_path / f).write_bytes((CLASSIFIER / f).read_bytes())
    meta = json.loads((tmp_path / "head.json").read_text())
    meta["categories"] = ["a", "b", "c", "d", "e", "f"]
    (tmp_path / "head.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained for categories"):
        load(tmp_path)


def test_calibration_keeps_the_confident_requests_and_picks_the_lowest_threshold_reaching_the_target() -> None:
    from router.coe.train import calibrated_threshold, calibration

    # three confident right answers, one unsure wrong one
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.55, 0.45]])
    probs = torch.cat([probs, torch.zeros(4, len(CATEGORIES) - 2)], dim=1)
    rows = {r["threshold"]: r for r in calibration(probs, torch.tensor([0, 0, 1, 1]))}
    assert rows[0.5] == {"threshold": 0.5, "coverage": 1.0, "accuracy": 0.75}
    assert rows[0.6] == {"threshold": 0.6, "coverage": 0.75, "accuracy": 1.0}
    assert calibrated_threshold(list(rows.values()), 0.9) == 0.6
    assert calibrated_threshold(list(rows.values()), 0.5) == 0.0


def test_an_unset_min_confidence_is_the_one_calibrated_with_the_shipped_head() -> None:
    from server.config import CoESettings, ExpertConfig, RouterSettings, Settings
    from server.routing import coe_config

    meta = json.loads((CLASSIFIER / "head.json").read_text())
    settings = Settings(experts=[ExpertConfig(name="a")], router=RouterSettings(coe=CoESettings()))
    config = coe_config(settings)
    assert config is not None and config.min_confidence == meta["min_confidence"] and config.fallback == "a"
    assert config.categories == {}  # the proposed map names no configured expert: all to the fallback
    explicit = Settings(experts=[ExpertConfig(name="a")], router=RouterSettings(coe=CoESettings(min_confidence=0.2)))
    assert coe_config(explicit).min_confidence == 0.2  # type: ignore[union-attr]


def test_the_maps_fallback_applies_only_with_the_map() -> None:
    from server.config import CoESettings, ExpertConfig, RouterSettings, Settings
    from server.routing import coe_config

    shipped = json.loads((CLASSIFIER / "map.json").read_text())
    experts = [ExpertConfig(name="first"), ExpertConfig(name=shipped["fallback"])]
    with_map = coe_config(Settings(experts=experts, router=RouterSettings(coe=CoESettings())))
    assert with_map is not None and with_map.fallback == shipped["fallback"]  # the best expert overall
    own = CoESettings(categories={"math": shipped["fallback"]})
    with_own_map = coe_config(Settings(experts=experts, router=RouterSettings(coe=own)))
    assert with_own_map is not None and with_own_map.fallback == "first"  # not benchmarked together: the first
