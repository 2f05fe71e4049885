-- The hash secret's fingerprints (an HMAC of a fixed label under the secret, never the secret):
-- keystile migrate records the current one, and an instance whose secret is not the newest
-- recorded (or, during a rotation, one of its previous secrets) refuses to start. recorded_at
-- orders them: the newest is the secret keys are being re-keyed to.
CREATE TABLE hash_secrets (
    fingerprint TEXT PRIMARY KEY,
    recorded_at DOUBLE PRECISION NOT NULL
);
-- The fingerprint of the secret each key's digest was made with; NULL for keys written before
-- this version, adopted by the first fingerprint recorded. Counted by keystile secret status.
ALTER TABLE keys ADD COLUMN digest_secret TEXT;
