-- Rate limits and credits. keys.limits and principals.limits hold a JSON array of
-- [name, limit, window seconds] (NULL: none); the hot-path loader reads both with the key.
-- credits: one row per key or principal with credits ("owner" is its id). "remaining" is the
-- balance as the instances last wrote it (spends are written in batches); "epoch" grows with
-- every set or replacing refill, so spends counted against an older balance are not written.
ALTER TABLE keys ADD COLUMN limits TEXT;
ALTER TABLE principals ADD COLUMN limits TEXT;
CREATE TABLE credits (
    owner          TEXT PRIMARY KEY,
    principal_id   TEXT NOT NULL,
    remaining      BIGINT NOT NULL,
    epoch          BIGINT NOT NULL,
    refill_amount  BIGINT,
    refill_every   TEXT,
    refill_day     INTEGER,
    refill_mode    TEXT,
    next_refill_at DOUBLE PRECISION,
    updated_at     DOUBLE PRECISION NOT NULL
);
CREATE INDEX credits_by_refill ON credits (next_refill_at);
