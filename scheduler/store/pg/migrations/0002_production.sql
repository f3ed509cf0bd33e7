-- 0002: production control plane: lease nonce, per-class retry budgets and backoff, attempt history with lease
-- intervals, idempotent metric upserts keyed (job, name, step), placement, worker quarantine, leader election,
-- cron schedules, config-hash reuse. Forward-only.

-- Fencing: the nonce is part of the token; an epoch reissued after a failover never matches an old holder.
ALTER TABLE jobs ADD COLUMN lease_nonce TEXT NOT NULL DEFAULT '';
-- Retries: failures per class ({"crash": 2, ...}), the backoff gate, and budget-free preemptions.
ALTER TABLE jobs ADD COLUMN class_failures JSONB NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN not_before TIMESTAMPTZ NOT NULL DEFAULT '-infinity';
ALTER TABLE jobs ADD COLUMN preemptions INT NOT NULL DEFAULT 0;
-- Placement.
ALTER TABLE jobs ADD COLUMN mem_estimate_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN gpus INT NOT NULL DEFAULT 1;
-- Config-hash reuse: this cell's result is that job's.
ALTER TABLE jobs ADD COLUMN reused_from BIGINT REFERENCES jobs(id);
CREATE INDEX jobs_config_hash_ok_idx ON jobs (config_hash) WHERE state = 'succeeded' AND reused_from IS NULL;
CREATE INDEX jobs_sweep_hash_idx ON jobs (sweep_id, config_hash);

-- Attempt history now records the lease interval: a row is written when the lease is granted (outcome
-- 'running') and closed on completion/expiry. I2 (no overlapping leases) is checked on these intervals.
ALTER TABLE job_attempts ADD COLUMN lease_nonce TEXT NOT NULL DEFAULT '';
ALTER TABLE job_attempts ADD COLUMN acquired_at TIMESTAMPTZ;
ALTER TABLE job_attempts ADD COLUMN resumed_from_step BIGINT;
ALTER TABLE job_attempts ADD COLUMN last_step BIGINT;
ALTER TABLE job_attempts ADD COLUMN leader_epoch BIGINT;   -- the leader epoch that reaped an expired lease
ALTER TABLE job_attempts ALTER COLUMN finished_at DROP NOT NULL;
ALTER TABLE job_attempts ALTER COLUMN finished_at DROP DEFAULT;

-- Metrics: unique on (job, name, step) across attempts; a replayed step after a resume overwrites (newest attempt
-- wins), a retried batch is a no-op. ingested_at lets the checker prove no stale write was accepted.
DELETE FROM metrics m USING metrics n
  WHERE m.job_id = n.job_id AND m.name = n.name AND m.step = n.step AND m.attempt < n.attempt;
ALTER TABLE metrics DROP CONSTRAINT metrics_pkey;
ALTER TABLE metrics ADD PRIMARY KEY (job_id, name, step);
ALTER TABLE metrics ADD COLUMN ingested_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE checkpoints ADD COLUMN lease_epoch BIGINT NOT NULL DEFAULT 0;

-- Workers: quarantine after consecutive failures.
ALTER TABLE workers ADD COLUMN consecutive_failures INT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN quarantined_until TIMESTAMPTZ;
ALTER TABLE workers ADD COLUMN quarantine_reason TEXT NOT NULL DEFAULT '';

-- Leader election: the advisory lock decides, this row numbers the terms; reaper and cron transitions check it.
CREATE TABLE leader (
  id          INT PRIMARY KEY CHECK (id = 1),
  epoch       BIGINT NOT NULL,
  holder      TEXT NOT NULL,
  acquired_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE leader_history (
  epoch       BIGINT PRIMARY KEY,
  holder      TEXT NOT NULL,
  acquired_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Cron schedules: a (schedule, due time) row exists at most once, so a due time fires at most once across
-- restarts and replicas; the sweep's idempotency key is derived from the same pair.
CREATE TABLE schedules (
  id            BIGSERIAL PRIMARY KEY,
  name          TEXT NOT NULL,
  cron          TEXT NOT NULL,
  spec_yaml     TEXT NOT NULL,
  next_due      TIMESTAMPTZ NOT NULL,
  created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
  skipped_count INT NOT NULL DEFAULT 0
);
CREATE TABLE schedule_runs (
  schedule_id BIGINT NOT NULL REFERENCES schedules(id) ON DELETE CASCADE,
  due_time    TIMESTAMPTZ NOT NULL,
  sweep_id    BIGINT REFERENCES sweeps(id),
  fired_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (schedule_id, due_time)
);
