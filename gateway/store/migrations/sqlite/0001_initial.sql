-- Keystile schema v1 (SQLite). Times are UNIX seconds; JSON columns hold msgspec-encoded arrays/objects.
CREATE TABLE principals (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    disabled    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
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
    digest               BLOB NOT NULL UNIQUE,
    previous_digest      BLOB UNIQUE,
    previous_valid_until REAL,
    name                 TEXT NOT NULL,
    start                TEXT NOT NULL,
    env                  TEXT NOT NULL,
    principal_id         TEXT NOT NULL REFERENCES principals(id),
    project              TEXT NOT NULL,
    scopes               TEXT,
    metadata             TEXT NOT NULL DEFAULT '{}',
    created_at           REAL NOT NULL,
    expires_at           REAL,
    revoked_at           REAL,
    last_used_at         REAL,
    request_count        INTEGER NOT NULL DEFAULT 0,
    UNIQUE (principal_id, project, name)
);
CREATE INDEX keys_by_owner ON keys (principal_id, project);
CREATE INDEX keys_by_created ON keys (created_at DESC, id DESC);

CREATE TABLE audit (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           REAL NOT NULL,
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
