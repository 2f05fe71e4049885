"""The key lifecycle as a Hypothesis state machine, checked against a model through the proxy.

Random sequences of: create principal (with grants), create key (narrowed or not; the key limit
applies), rotate (with a grace, or without), revoke, delete key, disable and enable a principal,
replace its grants (add or drop scopes, drop a whole project), delete a principal (refused while it
has keys, unless ``with_keys``). Every change goes through the admin API of a real Keystile over
real sockets (SQLite store, a real upstream). After every step, every secret ever issued in the
run is sent through the proxy to routes needing different scopes, and both the decision
(200/401/403) and the identity the upstream saw (key id, owner, project, scopes) must be what
the model says. A refused request must not reach the upstream, and no key-shaped value may appear
in what the upstream received.

Rotation grace: the grace is an hour and the run lasts seconds, so "the old secret is in its
grace" is a model state of its own (only the latest rotation's previous secret is kept); no
sleeps. Expiry is not modelled (no key here expires). Seeded (``derandomize``) and bounded.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets as pysecrets
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import uvloop
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from gateway.app import create_app
from gateway.config import Secrets
from gateway.store import open_store
from tests.adversarial import budget
from tests.adversarial.invariants import assert_no_key
from tests.conftest import ADMIN_TOKEN, HASH_SECRET, make_config
from tests.upstream import RecordingUpstream, Seen

T = TypeVar("T")

MAX_ACTIVE = 3
PROJECTS = ("alpha", "beta")
SCOPES = ("read", "write", "admin")
# prefix -> scopes the route needs (all routes need a key)
ROUTES = {"/open": (), "/r": ("read",), "/rw": ("read", "write")}
GRACE = 3600.0

scope_sets = st.frozensets(st.sampled_from(SCOPES))
grants_strategy = st.dictionaries(st.sampled_from(PROJECTS), scope_sets, max_size=2)


class Harness:
    """A Keystile and an upstream on a loop of their own thread; the state machine is synchronous."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="keystile-under-test", daemon=True)
        self.thread.start()
        self.run(self._start())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def _start(self) -> None:
        self.upstream = RecordingUpstream()
        await self.upstream.start()
        cfg = make_config(
            {
                "store": {"url": f"sqlite:///{self.tmp}/lifecycle.db"},
                "policy": {"max_active_keys": MAX_ACTIVE},
                # Every refused key is one address's failure: the throttle would answer 429 for
                # the model's 401s. What it does is tested in test_key_flood.
                "throttle": {"failures": 0},
                "routes": [
                    {"prefix": prefix, "upstream": self.upstream.url, "scopes": list(scopes)}
                    for prefix, scopes in ROUTES.items()
                ],
            }
        )
        self.store = await open_store(cfg.store.url)
        await self.store.migrate()
        self.gateway = create_app(cfg, Secrets(HASH_SECRET, (ADMIN_TOKEN.encode(),)), store=self.store)
        await self.gateway.start()
        # Keep-alive connections: a change must reach connections that already presented a key.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8))
        self.proxy = f"http://127.0.0.1:{self.gateway.proxy_port}"
        self.admin = f"http://127.0.0.1:{self.gateway.admin_port}"

    async def _stop(self) -> None:
        await self.session.close()
        await self.gateway.stop()
        await self.store.close()
        await self.upstream.stop()

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def _admin(self, method: str, path: str, body: Any = None, params: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with self.session.request(
            method, self.admin + path, json=body, params=params, headers=headers
        ) as r:
            return r.status, (await r.json() if r.content_length else None)

    def admin_call(self, method: str, path: str, body: Any = None, params: Any = None) -> tuple[int, Any]:
        return self.run(self._admin(method, path, body, params))

    async def _probe(self, secret: str, route: str, nonce: str) -> int:
        async with self.session.get(f"{self.proxy}{route}/{nonce}", headers={"X-API-Key": secret}) as r:
            await r.read()
            return r.status

    def probe_all(self, probes: list[tuple[str, str, str]]) -> list[int]:
        async def all_of() -> list[int]:
            return list(await asyncio.gather(*(self._probe(*p) for p in probes)))

        return self.run(all_of())

    def seen(self) -> dict[str, Seen]:
        """What the upstream received, by nonce (the last path segment)."""
        return {s.raw_path.rsplit("/", 1)[1]: s for s in self.upstream.received}


# -- the model -------------------------------------------------------------------------------


@dataclass
class PrincipalModel:
    name: str
    id: str
    grants: dict[str, frozenset[str]]
    disabled: bool = False
    deleted: bool = False


@dataclass
class KeyModel:
    id: str
    owner: PrincipalModel
    project: str
    narrowing: frozenset[str] | None
    current: str
    previous: str | None = None  # in its grace
    revoked: bool = False
    deleted: bool = False

    @property
    def active(self) -> bool:
        return not (self.revoked or self.deleted or self.owner.deleted)

    def effective(self) -> tuple[str, ...] | None:
        """Effective scopes (sorted, as the identity header lists them), or None: no grant there."""
        granted = self.owner.grants.get(self.project)
        if granted is None:
            return None
        own = granted if self.narrowing is None else self.narrowing & granted
        return tuple(sorted(own))


@dataclass
class Expected:
    status: int
    key: KeyModel | None = None


@dataclass
class Model:
    principals: list[PrincipalModel] = field(default_factory=list)
    keys: list[KeyModel] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)  # secrets rotated out or never valid again

    def holder(self, secret: str) -> KeyModel | None:
        """The key a secret works for now, if any."""
        for k in self.keys:
            if not k.active or k.owner.disabled:
                continue
            if secret == k.current or (k.previous is not None and secret == k.previous):
                return k
        return None

    def decide(self, secret: str, needs: tuple[str, ...]) -> Expected:
        k = self.holder(secret)
        if k is None:
            return Expected(401)
        effective = k.effective()
        if effective is None or not set(needs) <= set(effective):
            return Expected(403)
        return Expected(200, k)

    def secrets(self) -> Iterator[str]:
        for k in self.keys:
            yield k.current
            if k.previous is not None:
                yield k.previous
        yield from self.retired

    def active_keys(self, owner: PrincipalModel, project: str) -> int:
        return sum(1 for k in self.keys if k.owner is owner and k.project == project and k.active)


# -- the state machine -----------------------------------------------------------------------

_runs = itertools.count()


class KeyLifecycle(RuleBasedStateMachine):
    harness: Harness  # set by the test

    principals = Bundle("principals")
    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.run_id = f"r{next(_runs)}{pysecrets.token_hex(2)}"  # names unique across examples
        self.names = itertools.count()
        self.nonces = itertools.count()

    # principals

    @rule(target=principals, grants=grants_strategy)
    def create_principal(self, grants: dict[str, frozenset[str]]) -> PrincipalModel:
        name = f"{self.run_id}-p{next(self.names)}"
        status, body = self.harness.admin_call(
            "POST", "/v1/principals", {"name": name, "grants": {p: sorted(s) for p, s in grants.items()}}
        )
        assert status == 201, body
        p = PrincipalModel(name, body["id"], dict(grants))
        self.model.principals.append(p)
        return p

    @initialize(target=principals, grants=grants_strategy)
    def first_principal(self, grants: dict[str, frozenset[str]]) -> PrincipalModel:
        return self.create_principal(grants)

    def _set_grants(self, p: PrincipalModel, grants: dict[str, frozenset[str]]) -> None:
        status, body = self.harness.admin_call(
            "PATCH", f"/v1/principals/{p.id}", {"grants": {k: sorted(v) for k, v in grants.items()}}
        )
        if p.deleted:
            assert status == 404, body
            return
        assert status == 200, body
        p.grants = dict(grants)

    def _disable(self, p: PrincipalModel, disabled: bool) -> None:
        status, body = self.harness.admin_call(
            "POST", f"/v1/principals/{p.id}/{'disable' if disabled else 'enable'}"
        )
        if p.deleted:
            assert status == 404, body
            return
        assert status == 200 and body["disabled"] is disabled, body
        p.disabled = disabled

    def _delete(self, p: PrincipalModel, with_keys: bool) -> None:
        status, body = self.harness.admin_call(
            "DELETE", f"/v1/principals/{p.id}", params={"with_keys": "true" if with_keys else "false"}
        )
        if p.deleted:
            assert status == 404, body
            return
        has_keys = any(k.owner is p and not k.deleted for k in self.model.keys)
        if has_keys and not with_keys:
            assert (status, body["error"]) == (409, "principal_has_keys"), body
            return
        assert status == 204, body
        p.deleted = True
        for k in self.model.keys:
            if k.owner is p:
                k.deleted = True

    # One rule for every change to a principal, so that key changes get most of the steps.
    @rule(
        p=principals,
        change=st.sampled_from(
            ["grants", "drop scope", "disable", "enable", "delete", "delete with keys"]
        ),
        grants=grants_strategy,
        scope=st.sampled_from(SCOPES),
        project=st.sampled_from(PROJECTS),
    )
    def change_principal(
        self, p: PrincipalModel, change: str, grants: dict[str, frozenset[str]], scope: str, project: str
    ) -> None:
        if change == "grants":  # replace every grant: scopes and projects come and go
            self._set_grants(p, grants)
        elif change == "drop scope":  # one scope less in one project; the project goes with its last
            dropped = {k: v - {scope} if k == project else v for k, v in p.grants.items()}
            if project in dropped and not dropped[project]:
                del dropped[project]
            self._set_grants(p, dropped)
        elif change in ("disable", "enable"):
            self._disable(p, change == "disable")
        else:
            self._delete(p, change == "delete with keys")

    # keys

    @rule(
        target=keys,
        p=principals,
        project=st.sampled_from(PROJECTS),
        narrowing=st.none() | scope_sets,
    )
    def create_key(self, p: PrincipalModel, project: str, narrowing: frozenset[str] | None) -> Any:
        body: dict[str, Any] = {"owner": p.id, "project": project}
        if narrowing is not None:
            body["scopes"] = sorted(narrowing)
        status, reply = self.harness.admin_call("POST", "/v1/keys", body)
        if p.deleted:
            assert (status, reply["field"]) == (422, "owner"), reply
            return multiple()  # refused: nothing for the bundle
        if narrowing is not None and not narrowing <= p.grants.get(project, frozenset()):
            assert (status, reply["field"]) == (422, "scopes"), reply  # a narrowing within the grant only
            return multiple()
        if self.model.active_keys(p, project) >= MAX_ACTIVE:
            assert (status, reply["error"]) == (409, "key_limit_reached"), reply
            return multiple()
        assert status == 201, reply
        k = KeyModel(reply["id"], p, project, narrowing, reply["key"])
        self.model.keys.append(k)
        return k

    @rule(k=keys, grace=st.booleans())
    def rotate(self, k: KeyModel, grace: bool) -> None:
        status, reply = self.harness.admin_call(
            "POST", f"/v1/keys/{k.id}/rotate", {"grace_seconds": GRACE if grace else 0}
        )
        if k.deleted or k.owner.deleted:
            assert status == 404, reply
            return
        if k.revoked:
            assert (status, reply["error"]) == (409, "key_not_active"), reply
            return
        assert status == 200, reply
        if k.previous is not None:
            self.model.retired.append(k.previous)
        if grace:
            k.previous = k.current
        else:
            k.previous = None
            self.model.retired.append(k.current)
        k.current = reply["key"]

    @rule(k=keys)
    def revoke(self, k: KeyModel) -> None:
        status, reply = self.harness.admin_call("POST", f"/v1/keys/{k.id}/revoke")
        if k.deleted or k.owner.deleted:
            assert status == 404, reply
            return
        assert status == 200 and reply["status"] == "revoked", reply
        k.revoked = True

    @rule(k=consumes(keys))
    def delete_key(self, k: KeyModel) -> None:
        status, reply = self.harness.admin_call("DELETE", f"/v1/keys/{k.id}")
        if k.deleted or k.owner.deleted:
            assert status == 404, reply
            return
        assert status == 204, reply
        k.deleted = True

    # the check, after every step

    @invariant()
    def the_proxy_decides_as_the_model_says(self) -> None:
        probes: list[tuple[str, str, str]] = []
        expected: list[Expected] = []
        for secret in self.model.secrets():
            for route, needs in ROUTES.items():
                probes.append((secret, route, f"{self.run_id}n{next(self.nonces)}"))
                expected.append(self.model.decide(secret, needs))
        if not probes:
            return
        statuses = self.harness.probe_all(probes)
        seen = self.harness.seen()
        for (secret, route, nonce), status, want in zip(probes, statuses, expected, strict=True):
            where = f"{route} with {secret[:12]}…"
            assert status == want.status, f"{where}: got {status}, the model says {want.status}"
            got = seen.get(nonce)
            if want.key is None:
                assert got is None, f"{where}: refused, yet the upstream received it"
                continue
            assert got is not None, f"{where}: allowed, yet the upstream never saw it"
            k = want.key
            identity = {
                h: got.header(f"X-Keystile-{h}")
                for h in ("Key-Id", "Owner", "Project", "Scopes")
            }
            assert identity == {
                "Key-Id": [k.id],
                "Owner": [k.owner.name],
                "Project": [k.project],
                "Scopes": [",".join(k.effective() or ())],
            }, where
            assert_no_key(where, [v for _, v in got.headers])


@pytest.mark.slow
def test_the_key_lifecycle_matches_the_model(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    try:
        KeyLifecycle.harness = harness
        run_state_machine_as_test(
            KeyLifecycle,
            settings=settings(
                max_examples=budget.examples(30),
                stateful_step_count=15,
                derandomize=budget.seeded(),
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        harness.close()
