-- 0001: the walking-skeleton schema. Forward-only: never edit after merge; add 0002_*.sql instead.
CREATE TABLE sweeps (
  id               BIGSERIAL PRIMARY KEY,
  name             TEXT NOT NULL,
  spec_yaml        TEXT NOT NULL,
  spec_hash        TEXT NOT NULL,
  idempotency_key  TEXT NOT NULL UNIQUE,
  factor_names     JSONB NOT NULL DEFAULT '[]',
  state            TEXT NOT NULL DEFAULT 'active'
                   CHECK (state IN ('active', 'succeeded', 'failed', 'cancelled')),
  cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
  created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
  id               BIGSERIAL PRIMARY KEY,
  sweep_id         BIGINT NOT NULL REFERENCES sweeps(id) ON DELETE CASCADE,
  cell_index       INT NOT NULL,
  state            TEXT NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued', 'leased', 'running', 'succeeded', 'failed', 'cancelled')),
  attempt          INT NOT NULL DEFAULT 0,      -- attempts started so far; the first lease makes it 1
  lease_epoch      BIGINT NOT NULL DEFAULT 0,   -- bumped on every lease: the fencing token
  lease_expires_at TIMESTAMPTZ,
  worker_id        TEXT,
  cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
  factors          JSONB NOT NULL,
  params           JSONB NOT NULL,
  config_hash      TEXT NOT NULL,
  total_steps      BIGINT NOT NULL DEFAULT 0,
  latest_step      BIGINT NOT NULL DEFAULT 0,
  last_error       TEXT NOT NULL DEFAULT '',
  failure_class    TEXT NOT NULL DEFAULT '',
  created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
  queued_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
  started_at       TIMESTAMPTZ,
  finished_at      TIMESTAMPTZ,
  UNIQUE (sweep_id, cell_index)
);
-- LeaseNextJob scans queued jobs oldest first.
CREATE INDEX jobs_queued_idx ON jobs (queued_at, id) WHERE state = 'queued';
-- ExpireLeases scans live leases by expiry.
CREATE INDEX jobs_lease_idx ON jobs (lease_expires_at) WHERE state IN ('leased', 'running');
CREATE INDEX jobs_sweep_idx ON jobs (sweep_id);

CREATE TABLE job_attempts (
  job_id        BIGINT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  attempt       INT NOT NULL,
  lease_epoch   BIGINT NOT NULL,
  worker_id     TEXT,
  outcome       TEXT NOT NULL,     -- succeeded | failed | cancelled | expired
  failure_class TEXT NOT NULL DEFAULT '',
  message       TEXT NOT NULL DEFAULT '',
  exit_code     INT,
  finished_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (job_id, attempt)
);

CREATE TABLE metrics (
  job_id  BIGINT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  attempt INT NOT NULL,
  step    BIGINT NOT NULL,
  name    TEXT NOT NULL,
  value   DOUBLE PRECISION NOT NULL,
  time    TIMESTAMPTZ NOT NULL,
  -- A retried batch re-inserts the same keys: ON CONFLICT DO NOTHING makes ingest idempotent.
  PRIMARY KEY (job_id, attempt, name, step)
);

CREATE TABLE checkpoints (
  job_id     BIGINT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  attempt    INT NOT NULL,
  step       BIGINT NOT NULL,
  path       TEXT NOT NULL,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (job_id, step)
);

CREATE TABLE workers (
  id         TEXT PRIMARY KEY,
  hostname   TEXT NOT NULL DEFAULT '',
  resources  JSONB NOT NULL DEFAULT '{}',
  version    TEXT NOT NULL DEFAULT '',
  first_seen TIMESTAMPTZ NOT NULL DEFAULT now(),
  last_seen  TIMESTAMPTZ NOT NULL DEFAULT now()
);
