-- Roles, per-project policies and the source of audit rows (issue 22).
-- A role is a named set of scopes in one project. A grant row names the roles it holds as a JSON
-- array (grants.roles); the identity loader adds their scopes to the grant's own.
CREATE TABLE roles (
    project     TEXT NOT NULL,
    name        TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at  DOUBLE PRECISION NOT NULL,
    updated_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (project, name)
);
ALTER TABLE grants ADD COLUMN roles TEXT NOT NULL DEFAULT '[]';
-- A role change finds the grants of its project.
CREATE INDEX grants_by_project ON grants (project);
-- One project's own policy values (a JSON object of the fields it sets; the rest fall back to
-- the config).
CREATE TABLE project_policies (
    project    TEXT PRIMARY KEY,
    policy     TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
-- Where a change came from: api, cli or console. Rows from before this version came through the
-- API or the CLI; they read as api.
ALTER TABLE audit ADD COLUMN source TEXT NOT NULL DEFAULT 'api';
