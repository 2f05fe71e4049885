-- The invalidation outbox. Every admin write that changes what a key resolves to (revoke, rotate,
-- delete, update, grant change, principal disable or delete) inserts one row in its own
-- transaction, so a committed change is never without its invalidation. Instances read the rows
-- newer than the last they saw every cache.sync_interval (by seq, the primary key) and drop those
-- digests from their caches. SQLite writers are serialised (BEGIN IMMEDIATE), so seq order is
-- commit order; AUTOINCREMENT never hands out a seq again, even after pruning. digests: the
-- changed key digests, 32 bytes each, concatenated; NULL: every key.
CREATE TABLE invalidations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    digests    BLOB,
    created_at REAL NOT NULL
);
CREATE INDEX invalidations_by_time ON invalidations (created_at);
