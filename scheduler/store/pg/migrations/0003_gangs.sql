-- 0003: gang-scheduled multi-rank jobs (docs/control-plane.md, "Gangs"). A job with ranks > 1 runs as `ranks`
-- processes on as many distinct workers, granted together. Forward-only.
ALTER TABLE jobs ADD COLUMN ranks INT NOT NULL DEFAULT 1;

-- One row per rank of a forming or running gang. While the job is queued the rows are pending slots (renewed by
-- the holder's LeaseJob polls, dropped when not renewed by expires_at); when the last slot is taken the job is
-- leased once for the whole gang and every slot gets that attempt. Rank 0 is the first joiner: its rendezvous_addr
-- is the MASTER_ADDR:MASTER_PORT of every rank. Slots are deleted whenever the job leaves leased/running.
CREATE TABLE gang_slots (
  job_id          BIGINT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  rank            INT NOT NULL,
  worker_id       TEXT NOT NULL,
  rendezvous_addr TEXT NOT NULL DEFAULT '',
  attempt         INT NOT NULL DEFAULT 0,      -- 0 while pending; the job's attempt once the gang is granted
  expires_at      TIMESTAMPTZ NOT NULL,
  done            BOOLEAN NOT NULL DEFAULT false,
  PRIMARY KEY (job_id, rank),
  UNIQUE (job_id, worker_id)
);
CREATE INDEX gang_slots_worker_idx ON gang_slots (worker_id);
