"""The hash secret in the store, on every backend: fingerprints, adoption and guarded re-keying."""

from __future__ import annotations

import secrets

from gateway.keys import digest, generate_key
from gateway.store import Store
from tests.store.test_store import T0, make_key, make_principal

OLD_FP, NEW_FP = "0" * 32, "f" * 32


async def test_the_first_fingerprint_is_adopted_by_keys_written_before_it(store: Store) -> None:
    owner = await make_principal(store)
    await make_key(store, owner, "before")  # written without a fingerprint, as before migration 5
    assert await store.hash_secrets() == []
    await store.record_hash_secret(OLD_FP, T0)
    await store.record_hash_secret(OLD_FP, T0 + 5)  # recorded once
    assert await store.keys_by_secret(T0) == {OLD_FP: 1}
    # A later one is the newest even from a clock behind, and is not given to existing keys.
    await store.record_hash_secret(NEW_FP, T0 - 100)
    assert await store.hash_secrets() == [OLD_FP, NEW_FP]
    assert await store.keys_by_secret(T0) == {OLD_FP: 1}


async def test_a_key_is_re_keyed_only_to_the_newest_secret_with_its_outbox_row(store: Store) -> None:
    owner = await make_principal(store)
    rec, old = await make_key(store, owner)
    await store.record_hash_secret(OLD_FP, T0)
    new = digest(secrets.token_bytes(32), generate_key("ks", "live"))

    # Not the newest: nothing changes (an instance still on the old secret never re-keys back).
    assert (await store.rekey(rec.id, old, new, NEW_FP, previous=False)).digests == ()
    await store.record_hash_secret(NEW_FP, T0)
    assert (await store.rekey(rec.id, old, new, OLD_FP, previous=False)).digests == ()
    assert await store.find_identity(old, T0) is not None

    seq = await store.latest_invalidation()
    change = await store.rekey(rec.id, old, new, NEW_FP, previous=False)
    assert change.seq > seq and set(change.digests or ()) == {old, new}
    assert [i.digests for i in await store.invalidations_since(seq, 10)] == [change.digests]
    assert await store.find_identity(old, T0) is None
    found = await store.find_identity(new, T0)
    assert found is not None and found.key_id == rec.id
    assert await store.keys_by_secret(T0) == {NEW_FP: 1}
    # A second instance re-keying the same key finds nothing left to do.
    assert (await store.rekey(rec.id, old, new, NEW_FP, previous=False)).digests == ()
