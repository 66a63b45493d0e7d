-- One row per scheduled firing: the worker that claims it runs the job, so a
-- firing runs once however many workers share the database. A claim that is
-- not done within its lease (its worker died) may be claimed again.
CREATE TABLE job_firings (
    job TEXT NOT NULL,
    fire_at INTEGER NOT NULL,
    claimed_at INTEGER NOT NULL,
    -- A baseline row marks where a job's schedule starts; it ran nothing.
    baseline BOOLEAN NOT NULL DEFAULT FALSE,
    done BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (job, fire_at)
);
