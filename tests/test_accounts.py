"""Agent accounts (connectors/accounts.py): sign-in with email and password, the session
cookie, CSRF, lockout, disabled agents, password resets, operators.

Unit tests of the pieces, then the real stack: tenant "acct" (admin key
"acct-admin-key", tests/conftest.py) invites its agents through the admin API; the
operator account is written straight onto the config topic, as a first operator is
(there is no operator before the first one)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from cryptography.exceptions import InvalidTag

from connectors import accounts
from connectors.accounts import OPERATOR_TENANT, Session, secret_context
from connectors.config_log import SecretBox, config_record, publish_config
from kefu.config import config_key
from kefu.settings import Settings
from schemas.config import ConfigState
from schemas.topics import TopicNames
from tests.conftest import wait_for

TENANT = "acct"
ADMIN = {"X-Admin-Key": "acct-admin-key"}


# ------------------------------------------------------------------------- units


def test_keys_name_their_tenant_second() -> None:
    for key in (
        accounts.session_key("t1", "abc"),
        accounts.agent_sessions_key("t1", "amy"),
        accounts.failures_key("t1", "Amy@Example.com"),
    ):
        namespace, owner, *_ = key.split(":")
        assert namespace.startswith("kefu") and owner == "t1"
    # An email is case-insensitive and never in a key in clear.
    assert accounts.failures_key("t1", "Amy@Example.com ") == accounts.failures_key(
        "t1", "amy@example.com"
    )
    assert "amy" not in accounts.failures_key("t1", "amy@example.com")


def test_csrf_and_session_roles() -> None:
    session = Session("t1", "amy", "admin", "tok")
    assert accounts.csrf_ok(session, "tok")
    assert not accounts.csrf_ok(session, "other") and not accounts.csrf_ok(session, None)
    assert not session.operator
    assert Session(OPERATOR_TENANT, "olga", "operator", "x").operator
    assert not Session("t1", "olga", "operator", "x").operator


def test_password_hashes_are_argon2_and_sealed_per_entity() -> None:
    hashed = accounts.hash_password("correct horse")
    assert hashed.startswith("$argon2id$")
    assert accounts._verify(hashed, "correct horse")
    assert not accounts._verify(hashed, "wrong horse")
    assert not accounts._verify("", "anything")  # no password set: nothing matches
    box = SecretBox(b"k" * 32)
    sealed = box.seal_fields({"password": hashed}, secret_context("t1", "agent", "amy"))
    assert box.open(sealed["password"], "t1/agent/amy/password") == hashed
    with pytest.raises(InvalidTag):  # copied onto another agent, it does not open
        box.open(sealed["password"], "t1/agent/bob/password")


def test_agents_are_found_by_email_case_insensitively() -> None:
    state = ConfigState()
    state.apply(config_record("t1", "agent", "amy", {"name": "Amy", "email": "amy@x.io"}, "t"))
    state.apply(config_record("t2", "agent", "amy2", {"name": "Amy", "email": "amy@x.io"}, "t"))
    assert accounts.agent_by_email(state, "t1", " AMY@x.io") == (
        "amy",
        {"name": "Amy", "email": "amy@x.io"},
    )
    assert accounts.agent_by_email(state, "t1", "") is None
    assert accounts.agent_by_email(state, "t3", "amy@x.io") is None


# ------------------------------------------------------------------ the stack


def base(settings: Settings) -> str:
    return f"http://{settings.gateway.host}:{settings.gateway.port}"


@pytest.fixture
def http(pipeline: Settings) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base(pipeline), timeout=30) as client:
        yield client


def invite(
    http: httpx.Client,
    agent: str,
    role: str = "agent",
    tenant: str = TENANT,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[str, str]:
    """A new agent account (admin key of the tenant): its email and one-time password."""
    email = f"{agent}@{tenant.strip('_')}.example"
    got = http.post(
        f"/v1/admin/config/agent/{agent}/invite",
        json={"name": agent.title(), "email": email, "role": role, **extra},
        headers=headers if headers is not None else {"X-Admin-Key": f"{tenant}-admin-key"},
    )
    assert got.status_code == 201, got.text
    body = got.json()
    assert body["data"]["password"] == {"set": True} and len(body["password"]) >= 12
    return email, str(body["password"])


def sign_in(settings: Settings, tenant: str, email: str, password: str) -> tuple[httpx.Client, str]:
    """A browser-like client holding the session cookie, and the CSRF token."""
    client = httpx.Client(base_url=base(settings), timeout=30)
    got = client.post(
        "/v1/auth/login", json={"tenant": tenant, "email": email, "password": password}
    )
    assert got.status_code == 200, got.text
    cookie = got.headers["set-cookie"].lower()
    for attribute in ("httponly", "samesite=strict", "path=/"):
        assert attribute in cookie, cookie
    return client, str(got.json()["csrf"])


def login(http: httpx.Client, tenant: str, email: str, password: str) -> httpx.Response:
    return http.post(
        "/v1/auth/login", json={"tenant": tenant, "email": email, "password": password}
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_sign_in_session_and_csrf(pipeline: Settings, http: httpx.Client) -> None:
    agent = unique("amy")
    email, password = invite(http, agent, role="admin")
    client, csrf = sign_in(pipeline, TENANT, email.upper(), password)
    with closing(client):
        me = client.get("/v1/auth/session")
        assert me.status_code == 200 and me.json() | {"csrf": ""} == {
            "tenant": TENANT,
            "agent": agent,
            "role": "admin",
            "name": agent.title(),
            "csrf": "",
        }
        assert me.json()["csrf"] == csrf
        # The cookie authenticates the admin API; a write needs the CSRF token too.
        assert client.get("/v1/admin/config/team").status_code == 200
        body = {"version": 0, "data": {"title": "Hi", "text": "Hello!"}}
        url = f"/v1/admin/config/canned/{unique('c')}"
        refused = client.put(url, json=body)
        assert refused.status_code == 403 and "CSRF" in refused.text
        wrong = client.put(url, json=body, headers={"X-CSRF-Token": "not-it"})
        assert wrong.status_code == 403
        done = client.put(url, json=body, headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200 and done.json()["changed_by"] == f"agent:{agent}"
        # Logging out needs the token too; then the cookie is worth nothing.
        assert client.post("/v1/auth/logout").status_code == 403
        out = client.post("/v1/auth/logout", headers={"X-CSRF-Token": csrf})
        assert out.status_code == 200 and out.json() == {"signed_out": True}
        assert client.get("/v1/auth/session").status_code == 401


def test_an_agent_is_not_an_admin_and_tokens_still_work(
    pipeline: Settings, http: httpx.Client
) -> None:
    email, password = invite(http, unique("ann"))
    client, _ = sign_in(pipeline, TENANT, email, password)
    with closing(client):
        assert client.get("/v1/auth/session").json()["role"] == "agent"
        assert client.get("/v1/admin/config/team").status_code == 403
        # The tenant's other credentials are untouched by accounts.
        assert http.get("/v1/admin/config/team", headers=ADMIN).status_code == 200
        api = http.get("/v1/admin/keys", headers=ADMIN)
        assert api.status_code == 200, api.text
    # Wrong credentials: the same answer whether the email or the password is wrong.
    for wrong in (
        login(http, TENANT, email, "not-the-password"),
        login(http, TENANT, "x@y.z", "p"),
    ):
        assert wrong.status_code == 401 and "wrong email or password" in wrong.text
    assert login(http, "no-such-tenant", email, password).status_code == 401


def test_lockout_after_five_failures(pipeline: Settings, http: httpx.Client) -> None:
    email, password = invite(http, unique("lou"))
    for _ in range(accounts.MAX_FAILURES):
        assert login(http, TENANT, email, "guess").status_code == 401
    # Now even the right password is refused, with the time to wait.
    locked = login(http, TENANT, email.upper(), password)
    assert locked.status_code == 429, locked.text
    retry = int(locked.headers["Retry-After"])
    assert 0 < retry <= accounts.LOCKOUT_S and locked.json()["retry_after"] == retry
    # Per email: another agent of the tenant signs in.
    other, other_password = invite(http, unique("lia"))
    assert login(http, TENANT, other, other_password).status_code == 200


def test_disabled_agent_is_refused_and_signed_out(pipeline: Settings, http: httpx.Client) -> None:
    agent = unique("dan")
    email, password = invite(http, agent)
    client, _ = sign_in(pipeline, TENANT, email, password)
    with closing(client):
        entity = http.get(f"/v1/admin/config/agent/{agent}", headers=ADMIN).json()
        data = {k: v for k, v in entity["data"].items() if k != "password"}
        got = http.put(
            f"/v1/admin/config/agent/{agent}",
            json={"version": entity["version"], "data": {**data, "disabled": True}},
            headers=ADMIN,
        )
        assert got.status_code == 200, got.text
        assert got.json()["data"]["password"] == {"set": True}  # kept, never shown
        assert client.get("/v1/auth/session").status_code == 401
    refused = login(http, TENANT, email, password)
    assert refused.status_code == 401 and "disabled" in refused.text


def test_password_reset_ends_sessions(pipeline: Settings, http: httpx.Client) -> None:
    agent = unique("rey")
    email, password = invite(http, agent)
    first, _ = sign_in(pipeline, TENANT, email, password)
    second, _ = sign_in(pipeline, TENANT, email, password)
    with closing(first), closing(second):
        reset = http.post(f"/v1/admin/config/agent/{agent}/password", json={}, headers=ADMIN)
        assert reset.status_code == 200, reset.text
        assert reset.json()["sessions_ended"] == 2
        new_password = reset.json()["password"]
        assert new_password and new_password != password
        for client in (first, second):
            assert client.get("/v1/auth/session").status_code == 401
    assert login(http, TENANT, email, password).status_code == 401
    assert login(http, TENANT, email, new_password).status_code == 200
    # An admin may set a chosen one (not echoed back).
    chosen = http.post(
        f"/v1/admin/config/agent/{agent}/password",
        json={"password": "a-long-chosen-passphrase"},
        headers=ADMIN,
    )
    assert chosen.status_code == 200 and chosen.json()["password"] == ""
    assert login(http, TENANT, email, "a-long-chosen-passphrase").status_code == 200
    missing = http.post("/v1/admin/config/agent/nobody/password", json={}, headers=ADMIN)
    assert missing.status_code == 404


def write_operator(settings: Settings, agent: str, email: str, password: str) -> None:
    """The first operator: written onto the config topic (sealed as the gateway does)."""
    box = SecretBox(config_key(settings))
    context = secret_context(OPERATOR_TENANT, "agent", agent)
    data = box.seal_fields(
        {
            "name": "Olga",
            "email": email,
            "role": "operator",
            "password": accounts.hash_password(password),
        },
        context,
    )
    record = config_record(OPERATOR_TENANT, "agent", agent, data, "test")

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.servers, acks="all")
        await producer.start()
        try:
            await publish_config(producer, TopicNames(settings.topic_prefix).config, record)
        finally:
            await producer.stop()

    asyncio.run(send())


def test_operator_ids_come_from_the_email() -> None:
    from kefu.cli_accounts import operator_id, password_problem

    assert operator_id("Olga.Ops@example.com") == "Olga.Ops"
    assert operator_id("ops+kefu@example.com") == "ops-kefu"
    assert operator_id("_x@example.com") == "op_x"
    assert password_problem("short") and password_problem("x" * 201)
    assert password_problem("a-long-enough-one") is None


def test_cli_creates_the_first_operator(
    pipeline: Settings, http: httpx.Client, tmp_path: Any
) -> None:
    """``kefu accounts create-operator``: the password from a file (or a prompt), never
    from argv; the operator signs in; a second create of the same address is refused,
    ``--reset-password`` sets a new one."""
    from click.testing import CliRunner

    import kefu.cli_accounts
    from kefu.cli import main

    email, password = f"{unique('first')}@ops.example", "first-operator-pass"
    secret = tmp_path / "password"
    secret.write_text(password + "\n", encoding="utf-8")

    def cli(*args: str, stdin: str | None = None) -> Any:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kefu.cli_accounts, "load_settings", lambda: pipeline)
            return CliRunner().invoke(main, ["accounts", "create-operator", *args], input=stdin)

    made = cli("--email", email.upper(), "--name", "First Ops", "--password-file", str(secret))
    assert made.exit_code == 0, made.output
    assert "_ops" in made.output and password not in made.output
    wait_for(
        lambda: login(http, OPERATOR_TENANT, email, password).status_code == 200,
        10,
        "the CLI's operator live in the gateway",
    )
    client, _ = sign_in(pipeline, OPERATOR_TENANT, email, password)
    with closing(client):
        session = client.get("/v1/auth/session").json()
        assert (session["role"], session["name"]) == ("operator", "First Ops")
        assert client.get("/v1/admin/config/tenants").status_code == 200
    again = cli("--email", email, "--password-file", str(secret))
    assert again.exit_code != 0 and "exists" in again.output
    # No option takes the password itself; a short one is refused before anything runs.
    argv = cli("--email", email, "--password", password)
    assert argv.exit_code == 2 and "No such option" in argv.output
    short = cli("--email", email, "--reset-password", stdin="short\n")
    assert short.exit_code != 0 and "at least 10" in short.output
    reset = cli("--email", email, "--reset-password", stdin="second-operator-pass\n")
    assert reset.exit_code == 0, reset.output
    wait_for(
        lambda: login(http, OPERATOR_TENANT, email, "second-operator-pass").status_code == 200,
        10,
        "the new password live",
    )
    assert login(http, OPERATOR_TENANT, email, password).status_code == 401


def test_operator_manages_every_tenant(pipeline: Settings, http: httpx.Client) -> None:
    agent, email, password = unique("olga"), f"{unique('olga')}@ops.example", "operator-pass-1"
    write_operator(pipeline, agent, email, password)
    wait_for(
        lambda: login(http, OPERATOR_TENANT, email, password).status_code == 200,
        10,
        "the operator's account live in the gateway",
    )
    client, csrf = sign_in(pipeline, OPERATOR_TENANT, email, password)
    with closing(client):
        assert client.get("/v1/auth/session").json()["role"] == "operator"
        listed = client.get("/v1/admin/config/tenants")
        assert listed.status_code == 200
        ids = [t["id"] for t in listed.json()["tenants"]]
        assert TENANT in ids and "demo" in ids and OPERATOR_TENANT not in ids
        # A new tenant, and its first admin invited by the operator.
        new = unique("newco")
        made = client.post(
            "/v1/admin/config/tenants",
            json={"id": new, "name": "New Co", "language": "en"},
            headers={"X-CSRF-Token": csrf},
        )
        assert made.status_code == 201, made.text
        again = client.post(
            "/v1/admin/config/tenants", json={"id": new}, headers={"X-CSRF-Token": csrf}
        )
        assert again.status_code == 409
        bad = client.post(
            "/v1/admin/config/tenants", json={"id": "Bad_Id"}, headers={"X-CSRF-Token": csrf}
        )
        assert bad.status_code == 422
        email2, password2 = _operator_invite(client, csrf, new)
        boss, _ = sign_in(pipeline, new, email2, password2)
        with closing(boss):
            assert boss.get("/v1/admin/config/team").json()["tenant"] == new
            # The new tenant's admin sees only its own tenant.
            assert boss.get("/v1/admin/config/tenants").status_code == 403
            assert boss.get(f"/v1/admin/config/team?tenant={TENANT}").status_code == 403
        # The operator reads any tenant's configuration.
        theirs = client.get(f"/v1/admin/config/agent?tenant={TENANT}")
        assert theirs.status_code == 200 and theirs.json()["tenant"] == TENANT
    # A tenant admin cannot be made an operator, nor sign in as one elsewhere.
    wrong = http.post(
        f"/v1/admin/config/agent/{unique('x')}/invite",
        json={"name": "X", "email": "x@acct.example", "role": "operator"},
        headers=ADMIN,
    )
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"][-1] == "role"
    assert http.get("/v1/admin/config/tenants", headers=ADMIN).status_code == 403


def _operator_invite(client: httpx.Client, csrf: str, tenant: str) -> tuple[str, str]:
    email = f"boss@{tenant}.example"
    got = client.post(
        f"/v1/admin/config/agent/boss/invite?tenant={tenant}",
        json={"name": "Boss", "email": email, "role": "admin"},
        headers={"X-CSRF-Token": csrf},
    )
    assert got.status_code == 201, got.text
    return email, str(got.json()["password"])
