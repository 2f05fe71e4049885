-- Last use and request count move to a narrow table of their own. A usage flush updates one row
-- per key used since the last flush, at random places in the key space: on the wide keys table
-- each such row dirties a page of its own; rows of this narrow table share pages, so a flush
-- writes far fewer of them. keys.last_used_at and
-- keys.request_count stay: readers combine them with this table (latest time, summed counts), so
-- instances of the previous version keep working during a rolling upgrade.
CREATE TABLE key_usage (
    key_id        TEXT PRIMARY KEY REFERENCES keys(id) ON DELETE CASCADE,
    last_used_at  DOUBLE PRECISION NOT NULL,
    request_count BIGINT NOT NULL
);
