"""Intent recognition: the shipped bilingual set, the held-out accuracy, decisions."""

from __future__ import annotations

import pytest

from streams.intents import (
    CLARIFY,
    FAQ,
    HANDOFF,
    LLM,
    IntentClassifier,
    Prediction,
    clarifying_question,
    decide,
    evaluate,
    load_intents,
    normalize,
    split,
    terms,
)
from streams.llm import load_knowledge

SPECS = load_intents()
BY_NAME = load_knowledge(None).specs  # with the FAQ's answers
MODEL = IntentClassifier([(t, i) for s in SPECS for t, i, _ in s.labelled()])


def test_shipped_set_is_bilingual_with_at_least_15_intents() -> None:
    assert len(SPECS) >= 15
    for spec in SPECS:
        assert len(spec.examples["en"]) >= 10 and len(spec.examples["zh"]) >= 10, spec.intent
    assert {s.action for s in SPECS} == {"faq", "llm", "handoff"}


def test_features_normalise_full_width_and_case() -> None:
    assert normalize("ＲＥＦＵＮＤ  Please") == "refund please"
    assert terms("ＲＥＦＵＮＤ") == terms("refund")
    assert {"退款", "退", "款"} <= set(terms("我要退款"))


def test_held_out_split_is_disjoint_and_about_a_quarter() -> None:
    train, test = split(SPECS)
    assert not {t for t, _, _ in train} & {t for t, _, _ in test}
    assert 0.2 < len(test) / (len(train) + len(test)) < 0.3


def test_held_out_accuracy() -> None:
    """Recorded in bench/RESULTS.md. Chance is 1/19; confident answers must be right."""
    report = evaluate(SPECS)
    assert report.accuracy >= 0.7, report
    assert report.coverage > 0.2
    assert report.accuracy_above >= 0.95
    assert set(report.by_language) == {"en", "zh"}


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("Where is my order?", "order_status"),
        ("我的快递到哪了", "order_status"),
        ("I want a refund", "refund"),
        ("怎么退货", "refund"),
        ("转人工", "human_agent"),
        ("is this jacket waterproof", "product_question"),
    ],
)
def test_training_phrasings_are_recognised_confidently(text: str, intent: str) -> None:
    prediction = MODEL.predict(text)
    assert prediction.intent == intent
    assert prediction.confidence >= 0.9


def test_unrelated_question_is_not_confident() -> None:
    prediction = MODEL.predict("what is the airspeed of an unladen swallow")
    assert prediction.confidence < 0.5


def p(*ranked: tuple[str, float]) -> Prediction:
    return Prediction(tuple(ranked), 0.5)


def test_decisions_follow_the_threshold_and_the_intent_action() -> None:
    assert decide(p(("refund", 0.95), ("order_status", 0.05)), BY_NAME).action == FAQ
    assert decide(p(("human_agent", 0.97), ("refund", 0.03)), BY_NAME).action == HANDOFF
    assert decide(p(("damaged_item", 0.99), ("refund", 0.01)), BY_NAME).action == LLM
    # Below the threshold but two intents together are sure: ask which one.
    unsure = decide(p(("refund", 0.6), ("order_status", 0.35)), BY_NAME)
    assert unsure.action == CLARIFY and unsure.alternatives == ("refund", "order_status")
    # Nothing stands out: a model answers, with a hint only when plausible.
    vague = decide(p(("refund", 0.3), ("order_status", 0.1)), BY_NAME)
    assert vague.action == LLM and vague.intent is None
    # The threshold is a parameter (default 0.92).
    assert decide(p(("refund", 0.9), ("x", 0.1)), BY_NAME, threshold=0.85).action == FAQ
    assert decide(p(("refund", 0.9), ("x", 0.02)), BY_NAME).action == LLM


def test_clarifying_question_names_both_intents_in_the_customer_language() -> None:
    decision = decide(p(("refund", 0.6), ("order_status", 0.35)), BY_NAME)
    assert "refund" in clarifying_question(decision, BY_NAME, "en")
    zh = clarifying_question(decision, BY_NAME, "zh")
    assert "退款" in zh and "订单" in zh


def test_a_tenant_file_replaces_the_shipped_set(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "intents.json"
    path.write_text(
        '{"intents": [{"intent": "a", "action": "faq", "examples": {"en": ["apple pie"]},'
        ' "answer": {"en": "A"}}, {"intent": "b", "examples": {"en": ["banana split"]}}]}'
    )
    specs = load_intents(path)
    model = IntentClassifier([(t, i) for s in specs for t, i, _ in s.labelled()])
    assert model.predict("apple").intent == "a"
    assert specs[1].action == "llm"
