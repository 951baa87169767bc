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


def test_the_tenants_own_faq_answers_first_and_follows_the_config() -> None:
    from connectors.config_log import config_record
    from schemas.config import ConfigState
    from schemas.records import ReplyRequested
    from streams.responders import OfflineResponder, TenantFaq

    def request(text: str, tenant: str = "t1") -> ReplyRequested:
        return ReplyRequested(
            event_id="r1",
            conversation_id="c1",
            tenant_id=tenant,
            seq=2,
            occurred_at=1,
            message_event_id="m1",
            channel="api",
            text=text,
        )

    config = ConfigState()
    faq = TenantFaq(OfflineResponder(), config)
    before = faq.answer_now(request("开发票需要多久"))
    assert before is not None and before.responder == "offline-faq"
    entry = {
        "question": "开发票需要多久",
        "answer": "电子发票 24 小时内发到邮箱。",
        "keywords": ["发票"],
    }
    config.apply(config_record("t1", "faq", "invoice", entry, "admin"))
    answer = faq.answer_now(request("开发票需要多久？"))
    assert answer is not None and answer.responder == "tenant-faq"
    assert answer.text == "电子发票 24 小时内发到邮箱。" and answer.intent == "faq:invoice"
    # Another tenant's customers never get t1's answers; unrelated questions go on.
    other = faq.answer_now(request("开发票需要多久", tenant="t2"))
    assert other is not None and other.responder == "offline-faq"
    assert faq.answer_now(request("where is my parcel")).responder == "offline-faq"  # type: ignore[union-attr]
    config.apply(config_record("t1", "faq", "invoice", None, "admin", 10**13))  # deleted
    gone = faq.answer_now(request("开发票需要多久？"))
    assert gone is not None and gone.responder == "offline-faq"


def test_the_tenants_min_confidence_is_the_faq_bar_live() -> None:
    """The tenant FAQ's bar is /admin's ``min_confidence`` once set (the same score as
    "try a question": a keyword hit is 0.6, two 0.8), read at each answer."""
    from connectors.config_log import config_record
    from schemas.config import ConfigState
    from schemas.records import ReplyRequested
    from streams.responders import OfflineResponder, TenantFaq

    def request(text: str) -> ReplyRequested:
        return ReplyRequested(
            event_id="r1",
            conversation_id="c1",
            tenant_id="t1",
            seq=2,
            occurred_at=1,
            message_event_id="m1",
            channel="api",
            text=text,
        )

    config = ConfigState()
    faq = TenantFaq(OfflineResponder(), config)
    entry = {"question": "退货政策", "answer": "七天无理由退货。", "keywords": ["退货", "运费"]}
    config.apply(config_record("t1", "faq", "returns", entry, "admin"))
    asked = "请问退货的时候运费谁出呀，包裹已经寄出了"
    hit = faq.answer_now(request(asked))
    assert hit is not None and hit.responder == "tenant-faq" and hit.confidence == 0.8
    config.apply(config_record("t1", "ai", "-", {"min_confidence": 0.92}, "admin"))
    missed = faq.answer_now(request(asked))
    assert missed is not None and missed.responder == "offline-faq"
    assert faq.answer_now(request("退货政策")).responder == "tenant-faq"  # type: ignore[union-attr]
