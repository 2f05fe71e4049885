-- Keystile schema v1 (PostgreSQL). Times are UNIX seconds; JSON columns hold msgspec-encoded arrays/objects.
CREATE TABLE principals (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    disabled    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  DOUBLE PRECISION NOT NULL,
    metadata    TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE grants (
    principal_id TEXT NOT NULL REFERENCES principals(id) ON DELETE CASCADE,
    project      TEXT NOT NULL,
    scopes       TEXT NOT NULL,
    PRIMARY KEY (principal_id, project)
);

CREATE TABLE keys (
    id                   TEXT PRIMARY KEY,
    digest               BYTEA NOT NULL UNIQUE,
    previous_digest      BYTEA UNIQUE,
    previous_valid_until DOUBLE PRECISION,
    name                 TEXT NOT NULL,
    start                TEXT NOT NULL,
    env                  TEXT NOT NULL,
    principal_id         TEXT NOT NULL REFERENCES principals(id),
    project              TEXT NOT NULL,
    scopes               TEXT,
    metadata             TEXT NOT NULL DEFAULT '{}',
    created_at           DOUBLE PRECISION NOT NULL,
    expires_at           DOUBLE PRECISION,
    revoked_at           DOUBLE PRECISION,
    last_used_at         DOUBLE PRECISION,
    request_count        BIGINT NOT NULL DEFAULT 0,
    UNIQUE (principal_id, project, name)
);
CREATE INDEX keys_by_owner ON keys (principal_id, project);
CREATE INDEX keys_by_created ON keys (created_at DESC, id DESC);

CREATE TABLE audit (
    id           BIGSERIAL PRIMARY KEY,
    at           DOUBLE PRECISION NOT NULL,
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    target_type  TEXT NOT NULL,
    target_id    TEXT NOT NULL,
    principal_id TEXT,
    before       TEXT,
    after        TEXT
);
CREATE INDEX audit_by_target ON audit (target_id, id);
CREATE INDEX audit_by_principal ON audit (principal_id, id);
CREATE INDEX audit_by_time ON audit (at, id);
