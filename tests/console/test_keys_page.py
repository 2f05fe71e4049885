"""The API Keys page in a real browser: add (secret shown once, works through the proxy, last use
listed), modify, limits, rotate, refresh, revoke, delete, isolation between users, CSRF, expired
keys, search and pages. Screenshots for the README are written to docs/ by these tests."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from gateway.store import AuditFilter, KeyFilter, NotFound
from tests.conftest import ADMIN_TOKEN
from tests.console.harness import Harness, Served, wait_for

DOCS = Path(__file__).resolve().parents[2] / "docs"
_names = itertools.count(1)


@pytest.fixture(scope="module")
def served(harness: Harness) -> Served:
    return harness.start(
        console={"trusted_proxies": ["127.0.0.1"]},
        policy={"max_active_keys": 3, "max_rotation_grace": "24h"},
    )


@pytest.fixture(scope="module")
def single(harness: Harness) -> Served:
    return harness.start(console={"trusted_proxies": ["127.0.0.1"]}, policy={"max_active_keys": 1})


def user(served: Served, project: str = "shop") -> str:
    """A fresh principal with a grant in ``project``."""
    name = f"user{next(_names)}"
    served.principal(name, {project: ["orders:read", "orders:write"]})
    return name


@pytest.fixture
def browser_as(browser: Browser) -> Iterator:
    contexts = []

    def open_as(served: Served, name: str | None, path: str = "/keys", **ctx_kw: object) -> Page:
        ctx = browser.new_context(viewport={"width": 1280, "height": 760}, **ctx_kw)
        contexts.append(ctx)
        if name is not None:
            ctx.set_extra_http_headers({"X-Auth-Request-User": name})
        page = ctx.new_page()
        page.goto(served.console + path)
        return page

    yield open_as
    for c in contexts:
        c.close()


def row(page: Page, key_id: str):
    return page.locator(f"tr[data-key='{key_id}']")


def keys_of(served: Served, name: str) -> list:
    p = served.run(served.store.get_principal(name))
    return served.run(served.store.list_keys(KeyFilter(principal_id=p.id), 0.0)).items


def test_add_shows_the_secret_once_and_it_works(served: Served, browser_as) -> None:
    name = user(served)
    page = browser_as(served, name, timezone_id="Asia/Tokyo")
    page.get_by_test_id("add").click()
    dialog = page.get_by_test_id("shown-once")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("cannot be shown again")
    secret = page.get_by_test_id("secret").input_value()
    assert secret.startswith("ks_live_")
    expect(page.get_by_role("button", name="Copy")).to_be_visible()
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "console-secret.png"))
    (key,) = keys_of(served, name)
    assert key.name.startswith("API Key name ")
    assert page.url.endswith("/keys?project=shop") and secret not in page.url

    # The key works through the proxy; the list then shows its last use.
    assert served.proxy_status(secret) == 200
    page.reload()
    assert secret not in page.content()  # shown once: gone on reload
    expect(page.get_by_test_id("shown-once")).to_have_count(0)

    def used() -> bool:
        page.reload()
        return "Not used yet" not in row(page, key.id).inner_text()

    wait_for(used, what="the last use in the list")
    # Local time (Tokyo) in the text, UTC on hover.
    created = row(page, key.id).locator("time").first
    assert "UTC" in (created.get_attribute("title") or "")
    assert "UTC" not in created.inner_text()

    audit = served.run(served.store.list_audit(AuditFilter(key_id=key.id))).items
    assert any(e.action.endswith("create") and e.actor == name and e.source == "console" for e in audit)


def test_modify_name_duplicate_refused_and_expiry(served: Served, browser_as) -> None:
    name = user(served)
    first, _ = served.key(name, "shop", name="billing")
    second, _ = served.key(name, "shop", name="reports")
    page = browser_as(served, name, timezone_id="Europe/Berlin")
    row(page, second).get_by_role("link", name="Modify").click()
    dialog = page.get_by_test_id("dialog-modify")
    dialog.locator("#name").fill("billing")
    dialog.get_by_role("button", name="Save").click()
    expect(page.get_by_test_id("dialog-error")).to_contain_text("already exists")
    assert served.run(served.store.get_key(second)).name == "reports"

    dialog = page.get_by_test_id("dialog-modify")
    dialog.locator("#name").fill("reports v2")
    dialog.locator("input[name=expiry][value=at]").check()
    dialog.locator("input[name=expires_at]").fill("2031-05-04T10:30")
    dialog.get_by_role("button", name="Save").click()
    expect(page.get_by_test_id("notice")).to_contain_text("saved")
    rec = served.run(served.store.get_key(second))
    assert rec.name == "reports v2"
    # The browser's time zone (Europe/Berlin, UTC+2 in May) is taken into account.
    assert rec.expires_at == datetime(2031, 5, 4, 8, 30, tzinfo=UTC).timestamp()
    expect(row(page, second)).to_contain_text("reports v2")
    expect(row(page, second).locator("time").nth(1)).to_have_attribute("datetime", "2031-05-04T08:30:00Z")


def test_limit_reached_disables_add(served: Served, browser_as) -> None:
    name = user(served)
    for _ in range(3):
        served.key(name, "shop")
    page = browser_as(served, name)
    expect(page.get_by_test_id("add")).to_be_disabled()
    expect(page.get_by_test_id("add-reason")).to_contain_text("limit of 3 active keys")
    page.screenshot(path=str(DOCS / "console-list.png"))


def test_single_key_refresh_stops_the_old_key_at_once(single: Served, browser_as) -> None:
    name = user(single)
    key_id, old = single.key(name, "shop")
    assert single.proxy_status(old) == 200
    page = browser_as(single, name)
    row(page, key_id).get_by_role("link", name="Refresh API key").click()
    expect(page.get_by_test_id("dialog-refresh")).to_contain_text("stops working")
    page.get_by_role("button", name="Refresh API key").click()
    new = page.get_by_test_id("secret").input_value()
    assert new != old
    assert single.proxy_status(old) == 401
    assert single.proxy_status(new) == 200


def test_rotate_with_grace(served: Served, browser_as) -> None:
    name = user(served)
    key_id, old = served.key(name, "shop")
    page = browser_as(served, name)
    row(page, key_id).get_by_role("link", name="Rotate").click()
    page.get_by_label("1 hour").check()
    page.get_by_test_id("dialog-rotate").get_by_role("button", name="Rotate").click()
    new = page.get_by_test_id("secret").input_value()
    assert served.proxy_status(old) == 200 and served.proxy_status(new) == 200
    page.get_by_role("link", name="Done").click()
    expect(row(page, key_id).get_by_test_id("status")).to_have_text("In rotation grace")


def test_revoke(served: Served, browser_as) -> None:
    name = user(served)
    key_id, secret = served.key(name, "shop")
    assert served.proxy_status(secret) == 200
    page = browser_as(served, name)
    row(page, key_id).get_by_role("link", name="Revoke").click()
    page.get_by_test_id("dialog-revoke").get_by_role("button", name="Revoke").click()
    expect(row(page, key_id).get_by_test_id("status")).to_have_text("Revoked")
    assert served.proxy_status(secret) == 401


def test_delete_needs_two_confirmations(served: Served, browser_as) -> None:
    name = user(served)
    key_id, _ = served.key(name, "shop", name="old integration")
    page = browser_as(served, name)
    row(page, key_id).get_by_role("link", name="Delete").click()
    page.get_by_test_id("dialog-delete").get_by_role("link", name="Continue").click()
    second = page.get_by_test_id("dialog-delete2")
    expect(second).to_contain_text("old integration")
    page.screenshot(path=str(DOCS / "console-delete.png"))
    assert served.run(served.store.get_key(key_id)).name == "old integration"  # not yet
    second.get_by_role("button", name="Delete “old integration”").click()
    expect(page.get_by_test_id("notice")).to_contain_text("deleted")
    expect(row(page, key_id)).to_have_count(0)
    with pytest.raises(NotFound):
        served.run(served.store.get_key(key_id))


def _post(page: Page, path: str, fields: dict[str, str]) -> int:
    """A form POST from the page's own origin (what a forged form or script would send)."""
    return int(
        page.evaluate(
            """async ([path, fields]) => {
                const body = new URLSearchParams(fields);
                const r = await fetch(path, {method: "POST", body, redirect: "manual"});
                return r.status;
            }""",
            [path, fields],
        )
    )


def _csrf(page: Page) -> str:
    return page.locator("input[name=csrf]").first.input_value()


def test_users_see_and_touch_only_their_own_keys(served: Served, browser_as) -> None:
    a, b = user(served), user(served)
    b_key, b_secret = served.key(b, "shop", name="b's key")
    page = browser_as(served, a)
    expect(page.get_by_test_id("keys")).not_to_contain_text("b's key")
    csrf = _csrf(page)
    for action in ("revoke", "delete", "rotate", "refresh", "update"):
        fields = {"csrf": csrf, "confirm_name": "b's key", "name": "stolen", "expiry": "never", "scopes": "orders:read"}
        assert _post(page, f"/keys/{b_key}/{action}", fields) == 404
    response = page.goto(served.console + f"/keys?dialog=modify&key={b_key}")
    assert response is not None and response.status == 404
    # an operator's principal filter is not honoured for users
    page.goto(served.console + f"/keys?principal={b}")
    expect(page.get_by_test_id("keys")).not_to_contain_text("b's key")
    rec = served.run(served.store.get_key(b_key))
    assert rec.name == "b's key" and rec.revoked_at is None
    assert served.proxy_status(b_secret) == 200


def test_post_without_csrf_token_changes_nothing(served: Served, browser_as) -> None:
    name = user(served)
    key_id, secret = served.key(name, "shop")
    page = browser_as(served, name)
    assert _post(page, f"/keys/{key_id}/revoke", {}) == 403
    assert _post(page, f"/keys/{key_id}/revoke", {"csrf": "forged"}) == 403
    assert _post(page, "/keys/create", {"project": "shop"}) == 403
    assert served.run(served.store.get_key(key_id)).revoked_at is None
    assert len(keys_of(served, name)) == 1
    assert served.proxy_status(secret) == 200


def test_expired_key_is_listed_and_marked(served: Served, browser_as) -> None:
    name = user(served)
    key_id, _ = served.key(name, "shop", expires_in=0.2)
    rec = served.run(served.store.get_key(key_id))
    wait_for(lambda: time.time() > (rec.expires_at or 0) + 0.05, what="the key's expiry")
    page = browser_as(served, name)
    expect(row(page, key_id).get_by_test_id("status")).to_have_text("Expired")


def test_search_and_pages_newest_first(served: Served, browser_as) -> None:
    name = user(served)
    ids = []
    for i in range(23):
        key_id, _ = served.key(name, "shop", name=f"Batch {i:02d}")
        served.run(served.lifecycle.revoke_key(key_id, actor="test"))  # stay under the limit
        ids.append(key_id)
    page = browser_as(served, name)
    rows = page.locator("tbody tr[data-key]")
    expect(rows).to_have_count(20)
    assert rows.first.get_attribute("data-key") == ids[-1]  # newest first
    page.get_by_test_id("next").click()
    expect(rows).to_have_count(3)
    page.fill("input[name=q]", "bATCH 1")
    page.get_by_role("button", name="Search").click()
    expect(rows).to_have_count(10)


def test_operator_sees_every_principal_and_acts_as_admin(served: Served, browser_as) -> None:
    a = user(served)
    key_id, _ = served.key(a, "shop", name="ops target")
    page = browser_as(served, None, "/signin")
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.get_by_test_id("filters").locator("select[name=principal]").select_option(a)
    page.get_by_test_id("filters").get_by_role("button", name="Show").click()
    expect(row(page, key_id)).to_contain_text("ops target")
    row(page, key_id).get_by_role("link", name="Revoke").click()
    page.get_by_test_id("dialog-revoke").get_by_role("button", name="Revoke").click()
    expect(row(page, key_id).get_by_test_id("status")).to_have_text("Revoked")
    audit = served.run(served.store.list_audit(AuditFilter(key_id=key_id))).items
    assert any(e.actor.startswith("admin:") and e.source == "console" for e in audit)


def test_the_manage_keys_permission_reaches_other_principals_keys_in_that_project(
    served: Served, browser_as
) -> None:
    member = user(served)
    member_key, member_secret = served.key(member, "shop", name="member's key")
    outside = user(served, project="elsewhere")
    outside_key, _ = served.key(outside, "elsewhere", name="outside key")
    # The permission through a role: a project_admin role holding keystile:keys:manage.
    served.run(
        served.lifecycle.put_role("shop", "project_admin", scopes=["keystile:keys:manage"], actor="test")
    )
    lead = f"lead{next(_names)}"
    served.run(
        served.lifecycle.create_principal(
            lead, grants={"shop": ["orders:read"]}, roles={"shop": ["project_admin"]}, actor="test"
        )
    )
    page = browser_as(served, lead)
    expect(row(page, member_key)).to_be_visible()
    expect(page.get_by_test_id("keys")).not_to_contain_text("outside key")
    assert _post(page, f"/keys/{outside_key}/revoke", {"csrf": _csrf(page)}) == 404
    row(page, member_key).get_by_role("link", name="Revoke").click()
    page.get_by_test_id("dialog-revoke").get_by_role("button", name="Revoke").click()
    expect(row(page, member_key).get_by_test_id("status")).to_have_text("Revoked")
    assert served.proxy_status(member_secret) == 401
    audit = served.run(served.store.list_audit(AuditFilter(key_id=member_key))).items
    assert any(e.action == "key.revoke" and e.actor == lead and e.source == "console" for e in audit)
    # The member, without the permission, still sees only their own keys.
    other = browser_as(served, member)
    expect(other.get_by_test_id("keys")).not_to_contain_text("outside key")
