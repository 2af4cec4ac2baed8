"""The fine-tuning store's tables (jobs, their events and checkpoints, fine-tuned models), version by version.

A released version is never edited: a change is a new version (server/persistence/database.py).
"""

from __future__ import annotations

from server.persistence.database import Schema

SCHEMA = Schema(
    "fine_tuning",
    (
        (
            """CREATE TABLE IF NOT EXISTS ft_jobs (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            seq BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            model TEXT NOT NULL,
            kind TEXT NOT NULL,
            base_path TEXT NOT NULL,
            training_file TEXT NOT NULL,
            validation_file TEXT,
            hyperparameters TEXT NOT NULL,
            suffix TEXT,
            seed BIGINT NOT NULL,
            metadata TEXT,
            status TEXT NOT NULL,
            error TEXT,
            fine_tuned_model TEXT,
            finished_at BIGINT,
            trained_tokens BIGINT,
            result_files TEXT NOT NULL DEFAULT '[]',
            cancel_requested BIGINT NOT NULL DEFAULT 0,
            worker_pid BIGINT,
            estimated_finish BIGINT
        )""",
            "CREATE INDEX IF NOT EXISTS ft_jobs_by_tenant ON ft_jobs (tenant, seq)",
            """CREATE TABLE IF NOT EXISTS ft_events (
            seq AUTO_ID,
            id TEXT NOT NULL UNIQUE,
            job_id TEXT NOT NULL REFERENCES ft_jobs(id),
            created_at BIGINT NOT NULL,
            level TEXT NOT NULL,
            message TEXT NOT NULL,
            data TEXT,
            type TEXT NOT NULL
        )""",
            "CREATE INDEX IF NOT EXISTS ft_events_by_job ON ft_events (job_id, seq)",
            """CREATE TABLE IF NOT EXISTS ft_checkpoints (
            seq AUTO_ID,
            id TEXT NOT NULL UNIQUE,
            job_id TEXT NOT NULL REFERENCES ft_jobs(id),
            created_at BIGINT NOT NULL,
            step_number BIGINT NOT NULL,
            metrics TEXT NOT NULL,
            path TEXT NOT NULL,
            model_name TEXT NOT NULL
        )""",
            "CREATE INDEX IF NOT EXISTS ft_checkpoints_by_job ON ft_checkpoints (job_id, seq)",
            """CREATE TABLE IF NOT EXISTS ft_models (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            job_id TEXT NOT NULL,
            base TEXT NOT NULL,
            kind TEXT NOT NULL,
            adapter_path TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            deleted BIGINT NOT NULL DEFAULT 0
        )""",
        ),
        # 2: leases. A running job belongs to the replica whose supervisor renews `lease_expires_at`; a lapsed
        # lease (the replica died) puts the job back in the queue for another replica (`attempts` counts).
        (
            "ALTER TABLE ft_jobs ADD COLUMN lease_owner TEXT",
            "ALTER TABLE ft_jobs ADD COLUMN lease_expires_at BIGINT",
            "ALTER TABLE ft_jobs ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0",
        ),
    ),
)
