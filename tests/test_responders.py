from streams.responders import FALLBACK, OfflineResponder, features, language_of

RESPONDER = OfflineResponder()


def test_language_detection() -> None:
    assert language_of("我要退款") == "zh"
    assert language_of("I want a refund") == "en"
    assert language_of("退款 refund please now") == "en"


def test_chinese_features_are_bigrams() -> None:
    assert {"退款", "退", "款"} <= features("我要退款")


def test_answers_in_the_language_asked() -> None:
    english = RESPONDER.answer_text("how do I get a refund?")
    chinese = RESPONDER.answer_text("怎么退货")
    assert english.intent == chinese.intent == "refund"
    assert "30 days" in english.text and "30天" in chinese.text


def test_paraphrase_finds_the_same_intent() -> None:
    assert RESPONDER.answer_text("has my order shipped yet?").intent == "order_status"


def test_unknown_question_falls_back_without_an_intent() -> None:
    answer = RESPONDER.answer_text("what is the airspeed of an unladen swallow")
    assert answer.intent is None and answer.text == FALLBACK["en"]
