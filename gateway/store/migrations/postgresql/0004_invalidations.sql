-- The invalidation outbox. Every admin write that changes what a key resolves to (revoke, rotate,
-- delete, update, grant change, principal disable or delete) inserts one row in its own
-- transaction, so a committed change is never without its invalidation. Instances read the rows
-- newer than the last they saw every cache.sync_interval (by seq, the primary key) and drop those
-- digests from their caches; writers take an advisory lock before inserting, so seq order is
-- commit order and a reader never skips a row that commits late. digests: the changed key
-- digests, 32 bytes each, concatenated; NULL: every key. Rows older than the retention are pruned.
CREATE TABLE invalidations (
    seq        BIGSERIAL PRIMARY KEY,
    digests    BYTEA,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX invalidations_by_time ON invalidations (created_at);
