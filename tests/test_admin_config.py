"""The admin API of live configuration (connectors/admin_config.py): field errors (422),
optimistic concurrency (409), secrets sealed and never shown, a change live in a worker
and in the gateway within 2 s with no restart, the webhook test delivery, "try a
question" on the FAQ, word lists, and one tenant's admin kept out of another's.

Tenants "adm" and "adm2" (tests/conftest.py): admin keys "<tenant>-admin-key", webhooks
to the sink, which checks signatures with "<tenant>-webhook-secret"."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.exceptions import RequestValidationError

from connectors.admin_config import Caller, faq_match, terms, validated
from kefu.settings import Settings
from schemas.config import ConfigState
from tests.conftest import wait_for
from tests.test_accounts import base

TENANT = "adm"
ADMIN = {"X-Admin-Key": "adm-admin-key"}
OTHER = {"X-Admin-Key": "adm2-admin-key"}


# ------------------------------------------------------------------------- units


def _errors(
    kind: str, entity_id: str, data: dict[str, Any], state: ConfigState | None = None
) -> Any:
    caller = Caller("t1", "t1", "test", False)
    with pytest.raises(RequestValidationError) as raised:
        validated(state or ConfigState(), caller, kind, entity_id, data)
    return {tuple(e["loc"][2:]) or tuple(e["loc"]): e["msg"] for e in raised.value.errors()}


def test_field_errors_name_their_field() -> None:
    assert ("color",) in _errors("widget", "-", {"color": "blue"})
    assert "Mars/Base" in _errors("hours", "-", {"timezone": "Mars/Base"})[("timezone",)]
    assert ("days",) in _errors("hours", "-", {"days": {"mon": [["18:00", "09:00"]]}})
    for capacity in (0, 51, "many"):
        assert ("capacity",) in _errors("agent", "a1", {"name": "A", "capacity": capacity})
    assert ("email",) in _errors("agent", "a1", {"name": "A", "email": "not-an-email"})
    assert (
        "no such team: sales"
        in _errors("agent", "a1", {"name": "A", "teams": ["sales"]})[("teams",)]
    )
    assert ("nickname",) in _errors("team", "t", {"name": "T", "nickname": "x"})  # unknown field
    assert ("bot_token",) in _errors("channel", "telegram", {"bot_token": "nope"})
    assert ("url",) in _errors("webhook", "-", {"url": "ftp://x"})
    assert ("temperature",) in _errors("ai", "-", {"temperature": 3})
    # Ids: a tenant has one widget ("-"), channels are the known ones.
    assert ("path", "entity_id") in _errors("widget", "w1", {})
    assert ("path", "entity_id") in _errors("channel", "fax", {})
    # Every error at once, not the first one only.
    assert len(_errors("agent", "a1", {"name": "", "capacity": 0, "email": "x"})) == 3


def test_an_email_address_belongs_to_one_tenant() -> None:
    from connectors.config_log import config_record

    state = ConfigState()
    state.apply(config_record("t2", "channel", "email", {"addresses": ["help@t2.example"]}, "t"))
    taken = _errors("channel", "email", {"addresses": ["x@t1.example", "HELP@t2.example"]}, state)
    assert "help@t2.example" in taken[("addresses",)]
    assert ("from_address",) in _errors("channel", "email", {"from_address": "nope"})
    caller = Caller("t1", "t1", "test", False)
    mine = {"addresses": ["Help@T1.example"], "from_address": "Reply@T1.example"}
    assert validated(state, caller, "channel", "email", mine) == {
        "addresses": ["help@t1.example"],
        "from_address": "reply@t1.example",
    }


def test_valid_data_is_normalised() -> None:
    state = ConfigState()
    caller = Caller("t1", "t1", "test", False)
    from connectors.config_log import config_record

    state.apply(config_record("t1", "team", "sales", {"name": "Sales"}, "t"))
    data = validated(
        state, caller, "agent", "a1", {"name": " Amy ", "email": "Amy@X.io", "teams": ["sales"]}
    )
    assert data["name"] == "Amy" and data["email"] == "amy@x.io" and data["capacity"] == 3
    hours = {"timezone": "Asia/Shanghai", "days": {"mon": [["09:00", "18:00"]]}}
    assert validated(state, caller, "hours", "-", hours)["timezone"] == "Asia/Shanghai"


def test_faq_match_by_keywords_in_chinese_and_english() -> None:
    assert "退货" in terms("我想退货") and "refund" in terms("Refund please!")
    entries = {
        "refund": {
            "question": "How do I get a refund?",
            "answer": "Within 7 days.",
            "intent": "refund",
            "keywords": ["refund", "退款", "退货"],
        },
        "hours": {"question": "When are you open?", "answer": "9 to 6.", "keywords": ["open"]},
    }
    exact = faq_match(entries, "How do I get a refund?")
    assert exact["id"] == "refund" and exact["confidence"] == 1.0 and exact["decision"] == "answer"
    zh = faq_match(entries, "我要退货怎么办")
    assert zh["id"] == "refund" and zh["intent"] == "refund" and zh["answer"] == "Within 7 days."
    assert faq_match(entries, "something else entirely")["decision"] == "handoff"


# ------------------------------------------------------------------ the stack


@pytest.fixture
def http(pipeline: Settings) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base(pipeline), timeout=30) as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def worker_entity(settings: Settings, tenant: str, kind: str, entity_id: str) -> Any:
    url = f"http://127.0.0.1:{settings.worker.web_port}/config"
    try:
        got = httpx.get(url, params={"tenant": tenant, "kind": kind, "id": entity_id}, timeout=5)
    except httpx.HTTPError:
        return None
    return got.json().get("entity") if got.status_code == 200 else None


def test_crud_with_versions(pipeline: Settings, http: httpx.Client) -> None:
    team = unique("sales")
    url = f"/v1/admin/config/team/{team}"
    assert http.get(url, headers=ADMIN).status_code == 404
    created = http.put(url, json={"version": 0, "data": {"name": "Sales"}}, headers=ADMIN)
    assert created.status_code == 200, created.text
    v1 = created.json()["version"]
    assert created.json()["data"] == {"name": "Sales"}
    assert created.json()["changed_by"] == "admin-key:main"
    assert team in [
        i["id"] for i in http.get("/v1/admin/config/team", headers=ADMIN).json()["items"]
    ]
    # Creating it again, or writing with an old version: 409 with the version now.
    for stale in (0, v1 - 1):
        conflict = http.put(url, json={"version": stale, "data": {"name": "X"}}, headers=ADMIN)
        assert conflict.status_code == 409, conflict.text
        assert conflict.json()["detail"]["version"] == v1
    updated = http.put(url, json={"version": v1, "data": {"name": "Sales 2"}}, headers=ADMIN)
    assert updated.status_code == 200 and updated.json()["version"] > v1
    v2 = updated.json()["version"]
    # An agent in the team keeps it from being deleted.
    agent = unique("al")
    joined = http.put(
        f"/v1/admin/config/agent/{agent}",
        json={"version": 0, "data": {"name": "Al", "teams": [team], "capacity": 4}},
        headers=ADMIN,
    )
    assert joined.status_code == 200, joined.text
    assert http.delete(f"{url}?version={v2}", headers=ADMIN).status_code == 409
    agent_v = joined.json()["version"]
    gone = http.delete(f"/v1/admin/config/agent/{agent}?version={agent_v}", headers=ADMIN)
    assert gone.status_code == 200
    assert http.delete(f"{url}?version={v1}", headers=ADMIN).status_code == 409  # stale
    assert http.delete(f"{url}?version={v2}", headers=ADMIN).json() == {"id": team, "deleted": True}
    assert http.get(url, headers=ADMIN).status_code == 404
    # Re-created after a delete: from the version the tombstone holds.
    again = http.put(url, json={"version": 0, "data": {"name": "S"}}, headers=ADMIN)
    assert again.status_code == 409 and again.json()["detail"]["version"] > v2


def test_bad_input_is_a_field_error_and_nothing_is_published(
    pipeline: Settings, http: httpx.Client
) -> None:
    def put(kind: str, entity_id: str, data: dict[str, Any]) -> httpx.Response:
        url = f"/v1/admin/config/{kind}/{entity_id}"
        return http.put(url, json={"version": 0, "data": data}, headers=ADMIN)

    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("widget", "-", {"color": "#12345g"}, "color"),
        ("hours", "-", {"timezone": "Mars/Olympus"}, "timezone"),
        ("agent", unique("a"), {"name": "A", "capacity": 1000}, "capacity"),
        ("agent", unique("a"), {"name": "A", "teams": ["no-such-team"]}, "teams"),
        ("agent", unique("a"), {"name": "A", "email": "a@"}, "email"),
        ("canned", unique("c"), {"title": "", "text": "x"}, "title"),
    ]
    for kind, entity_id, data, field in cases:
        got = put(kind, entity_id, data)
        assert got.status_code == 422, got.text
        assert got.json()["detail"][0]["loc"] == ["body", "data", field], got.text
        # Nothing half-applied: the entity was not written.
        assert http.get(f"/v1/admin/config/{kind}/{entity_id}", headers=ADMIN).status_code == 404
    assert put("nonsense", "x", {}).status_code == 422
    assert http.get("/v1/admin/config/team").status_code == 401
    assert http.get("/v1/admin/config/team", headers={"X-Admin-Key": "wrong"}).status_code == 401


def test_a_change_is_live_in_a_worker_and_the_gateway_within_2_s(
    pipeline: Settings, http: httpx.Client
) -> None:
    canned = unique("greet")
    started = time.monotonic()
    got = http.put(
        f"/v1/admin/config/canned/{canned}",
        json={"version": 0, "data": {"title": "你好", "text": "您好，有什么可以帮您？"}},
        headers=ADMIN,
    )
    assert got.status_code == 200, got.text
    version = got.json()["version"]
    # The answer came after the gateway applied it: the gateway already shows it.
    in_gateway = time.monotonic() - started
    shown = http.get(f"/v1/admin/config/canned/{canned}", headers=ADMIN).json()
    assert shown["version"] == version and shown["data"]["title"] == "你好"
    entity = wait_for(
        lambda: (
            (e := worker_entity(pipeline, TENANT, "canned", canned)) and e["version"] == version
        ),
        5,
        "the worker's /config to show the change",
    )
    in_worker = time.monotonic() - started
    assert entity
    print(f"live in the gateway after {in_gateway:.3f} s, in the worker after {in_worker:.3f} s")
    assert in_gateway < 2.0 and in_worker < 2.0


def test_secrets_are_write_only(pipeline: Settings, http: httpx.Client) -> None:
    url = "/v1/admin/config/channel/telegram"
    current = http.get(url, headers=ADMIN)
    version = current.json()["version"] if current.status_code == 200 else 0
    token = f"1234:{uuid.uuid4().hex}"
    got = http.put(
        url,
        json={"version": version, "data": {"bot_token": token, "secret_token": "s-e-c"}},
        headers=ADMIN,
    )
    assert got.status_code == 200, got.text
    assert got.json()["data"] == {"bot_token": {"set": True}, "secret_token": {"set": True}}
    listing = http.get("/v1/admin/config/channel", headers=ADMIN)
    assert token not in listing.text and "s-e-c" not in listing.text
    callbacks = listing.json()["callbacks"]
    assert callbacks["telegram"] == f"{base(pipeline)}/v1/telegram/{TENANT}/webhook"
    assert callbacks["wechat"] == f"{base(pipeline)}/v1/wechat/{TENANT}/callback"
    # The worker holds it sealed; omitted on the next write, it stays; "" clears it.
    v = got.json()["version"]
    wait_for(
        lambda: (e := worker_entity(pipeline, TENANT, "channel", "telegram")) and e["version"] == v,
        5,
        "the worker",
    )
    assert token not in str(worker_entity(pipeline, TENANT, "channel", "telegram"))
    kept = http.put(url, json={"version": v, "data": {"secret_token": ""}}, headers=ADMIN)
    assert kept.status_code == 200, kept.text
    assert kept.json()["data"] == {"bot_token": {"set": True}}


def test_webhook_test_delivery_is_signed(pipeline: Settings, http: httpx.Client) -> None:
    sink = f"http://127.0.0.1:{pipeline.dev.webhook_sink_port}/webhook"
    url = "/v1/admin/config/webhook/-"
    current = http.get(url, headers=ADMIN)
    version = current.json()["version"] if current.status_code == 200 else 0

    def save(secret: str, seen: int) -> int:
        got = http.put(
            url, json={"version": seen, "data": {"url": sink, "secret": secret}}, headers=ADMIN
        )
        assert got.status_code == 200, got.text
        assert got.json()["data"]["secret"] == {"set": True}
        return int(got.json()["version"])

    version = save("adm-webhook-secret", version)
    ok = http.post("/v1/admin/config/webhook/test", json={}, headers=ADMIN)
    assert ok.status_code == 200 and ok.json()["ok"] and ok.json()["status"] == 200, ok.text
    save("a-wrong-secret", version)  # the sink refuses the signature: the page says so
    refused = http.post("/v1/admin/config/webhook/test", json={}, headers=ADMIN).json()
    assert refused["ok"] is False and refused["status"] == 401
    nowhere = http.post(
        "/v1/admin/config/webhook/test", json={"url": "http://127.0.0.1:9/x"}, headers=ADMIN
    ).json()
    assert nowhere["ok"] is False and nowhere["status"] is None


def test_faq_try_and_word_lists(pipeline: Settings, http: httpx.Client) -> None:
    faq = unique("refund")
    entry = {
        "question": "怎么退款？",
        "answer": "七天内无理由退款。",
        "intent": "refund",
        "keywords": ["退款", "refund"],
    }
    put = http.put(f"/v1/admin/config/faq/{faq}", json={"version": 0, "data": entry}, headers=ADMIN)
    assert put.status_code == 200, put.text
    tried = http.post("/v1/admin/config/faq/try", json={"question": "我想退款"}, headers=ADMIN)
    assert tried.status_code == 200
    assert tried.json()["intent"] == "refund" and tried.json()["answer"] == "七天内无理由退款。"
    words = http.put(
        "/v1/admin/config/wordlists/custom",
        json={"action": "mask", "words": ["badword", " badword ", "坏词"]},
        headers=ADMIN,
    )
    assert words.status_code == 200, words.text
    assert words.json()["words"] == ["badword", "坏词"]
    listed = http.get("/v1/admin/config/wordlists", headers=ADMIN).json()["lists"]
    assert {"category": "custom", "action": "mask"}.items() <= listed[0].items()
    bad = http.put(
        "/v1/admin/config/wordlists/Bad!", json={"action": "mask", "words": []}, headers=ADMIN
    )
    assert bad.status_code == 422


def test_another_tenants_admin_sees_and_changes_nothing(
    pipeline: Settings, http: httpx.Client
) -> None:
    canned = unique("mine")
    mine = http.put(
        f"/v1/admin/config/canned/{canned}",
        json={"version": 0, "data": {"title": "A", "text": "adm's own"}},
        headers=ADMIN,
    )
    assert mine.status_code == 200
    version = mine.json()["version"]
    assert canned not in http.get("/v1/admin/config/canned", headers=OTHER).text
    assert http.get(f"/v1/admin/config/canned/{canned}", headers=OTHER).status_code == 404
    for method, path in (
        ("GET", f"/v1/admin/config/canned?tenant={TENANT}"),
        ("GET", f"/v1/admin/config/canned/{canned}?tenant={TENANT}"),
        ("DELETE", f"/v1/admin/config/canned/{canned}?tenant={TENANT}&version={version}"),
    ):
        assert http.request(method, path, headers=OTHER).status_code == 403, path
    steal = http.put(
        f"/v1/admin/config/canned/{canned}?tenant={TENANT}",
        json={"version": version, "data": {"title": "B", "text": "B was here"}},
        headers=OTHER,
    )
    assert steal.status_code == 403
    # B's write without a tenant is B's own entity of the same id.
    own = http.put(
        f"/v1/admin/config/canned/{canned}",
        json={"version": 0, "data": {"title": "B", "text": "adm2's own"}},
        headers=OTHER,
    )
    assert own.status_code == 200
    after = http.get(f"/v1/admin/config/canned/{canned}", headers=ADMIN).json()
    assert after["version"] == version and after["data"]["text"] == "adm's own"
