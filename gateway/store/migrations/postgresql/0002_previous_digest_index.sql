-- A partial index for the rotation-grace lookup: almost every previous_digest is NULL, and with
-- statistics the planner otherwise prefers a table scan for "previous_digest IN (...)".
CREATE INDEX keys_by_previous_digest ON keys (previous_digest) WHERE previous_digest IS NOT NULL;
