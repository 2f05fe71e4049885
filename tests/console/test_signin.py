"""Who may sign in to the console: operators with an admin token, users named by a trusted proxy;
never an API key, never the identity header from an untrusted address. Security headers on
every page."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, expect

from gateway.store import NotFound
from tests.conftest import ADMIN_TOKEN
from tests.console.harness import Harness, Served


@pytest.fixture(scope="module")
def served(harness: Harness) -> Served:
    s = harness.start(console={"trusted_proxies": ["127.0.0.1/32"]})
    s.principal("alice", {"shop": ["orders:read"]})
    return s


@pytest.fixture(scope="module")
def untrusting(harness: Harness) -> Served:
    # The proxy in front is elsewhere (a documentation address): this test's browser is not it.
    return harness.start(console={"trusted_proxies": ["192.0.2.10"], "auto_create_principals": True})


@pytest.fixture
def page(browser: Browser) -> Iterator:
    ctx = browser.new_context()
    yield ctx.new_page()
    ctx.close()


def test_operator_signs_in_and_out(served: Served, page) -> None:
    page.goto(served.console + "/keys")
    expect(page).to_have_url(served.console + "/signin")
    page.fill("#token", "not-the-admin-token-at-all")
    page.click("button[type=submit]")
    expect(page.get_by_test_id("error")).to_contain_text("not a valid admin token")

    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    expect(page).to_have_url(served.console + "/keys")
    expect(page.get_by_test_id("who")).to_contain_text("Operator admin:")
    cookie = next(c for c in page.context.cookies() if c["name"] == "keystile-console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(served.console + "/signin")
    page.goto(served.console + "/keys")
    expect(page).to_have_url(served.console + "/signin")  # the old session is gone


def test_an_api_key_never_signs_in(served: Served, page) -> None:
    _, secret = served.key("alice", "shop")
    page.goto(served.console + "/signin")
    page.fill("#token", secret)
    page.click("button[type=submit]")
    expect(page.get_by_test_id("error")).to_contain_text("An API key cannot sign in")
    expect(page).to_have_url(served.console + "/signin")

    page.context.set_extra_http_headers({"X-Auth-Request-User": secret})
    response = page.goto(served.console + "/keys")
    assert response is not None and response.status == 403
    expect(page.get_by_test_id("message")).to_contain_text("An API key cannot sign in")


def test_user_named_by_a_trusted_proxy(served: Served, page) -> None:
    page.context.set_extra_http_headers({"X-Auth-Request-User": "alice"})
    page.goto(served.console + "/keys")
    expect(page.get_by_test_id("who")).to_contain_text("Signed in as alice")
    expect(page.get_by_test_id("profile")).to_contain_text("orders:read")


def test_unknown_user_without_auto_create_gets_no_access(served: Served, page) -> None:
    page.context.set_extra_http_headers({"X-Auth-Request-User": "mallory"})
    response = page.goto(served.console + "/keys")
    assert response is not None and response.status == 403
    expect(page.get_by_test_id("message")).to_contain_text("no access")


def test_identity_header_from_an_untrusted_address_is_refused(untrusting: Served, page) -> None:
    page.context.set_extra_http_headers({"X-Auth-Request-User": "alice"})
    response = page.goto(untrusting.console + "/keys")
    assert response is not None and response.status == 403
    expect(page.get_by_test_id("message")).to_contain_text("sign-in is refused")
    with pytest.raises(NotFound):
        untrusting.run(untrusting.store.get_principal("alice"))  # nobody was created


def test_security_headers_on_every_page(served: Served, page) -> None:
    for path in ("/signin", "/keys", "/static/console.css", "/nope"):
        response = page.goto(served.console + path)
        assert response is not None
        h = response.headers
        assert "unsafe-inline" not in h["content-security-policy"]
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert h["x-frame-options"] == "DENY"
        assert h["referrer-policy"] == "no-referrer"
        if not path.startswith("/static/"):
            assert h["cache-control"] == "no-store"
