"""Console sessions: idle and absolute expiry on an injected clock, the show-once slot, config."""

from __future__ import annotations

import pytest

from gateway.clock import ManualClock
from gateway.config import ConfigError
from gateway.console.access import Viewer, looks_like_api_key, may_manage, parse_networks, trusted
from gateway.console.sessions import SECRET_HOLD, SessionStore
from gateway.keys import generate_key
from gateway.models import KeyRecord, Principal
from tests.conftest import make_config


def test_idle_and_absolute_expiry() -> None:
    clock = ManualClock()
    store = SessionStore(idle=60, absolute=300, clock=clock)
    s = store.new("operator", "admin:0011aabb")
    for _ in range(5):  # kept alive by use...
        clock.advance(59)
        assert store.get(s.id) is s
    clock.advance(59)  # ...but never past the absolute limit (295 + 59 > 300)
    assert store.get(s.id) is None
    idle = store.new("operator", "admin:0011aabb")
    clock.advance(61)
    assert store.get(idle.id) is None


def test_a_secret_is_handed_out_once_and_not_kept() -> None:
    clock = ManualClock()
    store = SessionStore(idle=600, absolute=3600, clock=clock)
    s = store.new("user", "alice")
    store.hold_secret(s, "key_1", "ks_live_secret")
    shown = store.take_secret(s)
    assert shown is not None and shown.secret == "ks_live_secret"
    assert store.take_secret(s) is None
    store.hold_secret(s, "key_1", "ks_live_secret")
    clock.advance(SECRET_HOLD + 1)
    assert store.take_secret(s) is None


def _key(principal_id: str, project: str) -> KeyRecord:
    return KeyRecord(
        id="key_x", name="k", start="ks_live_abcd", env="live", principal_id=principal_id,
        principal="p", project=project, scopes=None, created_at=0, expires_at=None, revoked_at=None,
        last_used_at=None, request_count=0,
    )


def test_may_manage_only_own_keys_in_granted_projects() -> None:
    alice = Principal(id="prn_a", name="alice", kind="user", disabled=False, created_at=0, grants={"shop": ("r",)})
    viewer = Viewer("user", "alice", alice)
    assert may_manage(viewer, _key("prn_a", "shop"))
    assert not may_manage(viewer, _key("prn_b", "shop"))
    assert not may_manage(viewer, _key("prn_a", "other"))
    assert may_manage(Viewer("operator", "admin:00"), _key("prn_b", "other"))


def test_api_keys_and_trust() -> None:
    assert looks_like_api_key(generate_key("ks", "live"), "ks")
    assert not looks_like_api_key("alice@example.com", "ks")
    nets = parse_networks(["10.0.0.0/8", "::1"])
    assert trusted("10.1.2.3", nets) and trusted("::ffff:10.1.2.3", nets) and trusted("::1", nets)
    assert not trusted("192.0.2.1", nets) and not trusted(None, nets) and not trusted("127.0.0.1", ())


def test_console_config_problems_named_per_field() -> None:
    with pytest.raises(ConfigError) as e:
        make_config(
            {
                "console": {
                    "listen": "nowhere",
                    "trusted_proxies": ["not-an-address"],
                    "identity_header": "Bad Header",
                    "session_idle": "2h",
                    "session_absolute": "1h",
                }
            }
        )
    text = "\n".join(e.value.problems)
    for field in ("console.listen", "console.trusted_proxies[0]", "console.identity_header", "console.session_idle"):
        assert field in text
