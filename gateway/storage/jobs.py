"""Fine-tuning jobs and their events, in the gateway's SQLite.

Status changes are conditional updates (`UPDATE ... WHERE status IN (...)`), so a cancel and
the trainer racing for one job can never both win: whoever changes the row first decides.
Lists are newest first, with `after` = the id of the last item of the previous page.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from sqlite3 import Row
from typing import Any

from gateway.storage.database import Database
from gateway.protocol.fine_tuning_schemas import (
    CreateFineTuningJob,
    FineTuningJob,
    FineTuningJobEvent,
    Hyperparameters,
    JobError,
    JobStatus,
    LoraOptions,
    Method,
    SupervisedMethod,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fine_tuning_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    suffix TEXT,
    seed INTEGER NOT NULL,
    metadata TEXT,
    hyperparameters TEXT NOT NULL,
    lora TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    finished_at INTEGER,
    fine_tuned_model TEXT,
    trained_tokens INTEGER,
    error TEXT,
    estimated_finish INTEGER
);
CREATE INDEX IF NOT EXISTS fine_tuning_jobs_by_tenant ON fine_tuning_jobs (tenant, seq);
CREATE INDEX IF NOT EXISTS fine_tuning_jobs_by_status ON fine_tuning_jobs (status, seq);
CREATE TABLE IF NOT EXISTS fine_tuning_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL,
    type TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fine_tuning_events_by_job ON fine_tuning_events (job_id, seq);
"""

TERMINAL: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
_UPDATABLE = {"status", "finished_at", "fine_tuned_model", "trained_tokens", "error", "estimated_finish",
              "hyperparameters"}


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.register(_SCHEMA)

    # -- jobs ----------------------------------------------------------------------------------------
    def create(self, tenant: str, request: CreateFineTuningJob, seed: int) -> FineTuningJob:
        job_id = f"ftjob-{secrets.token_hex(12)}"
        self.db.execute(
            "INSERT INTO fine_tuning_jobs (id, tenant, model, training_file, validation_file, suffix, seed, metadata,"
            " hyperparameters, lora, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id, tenant, request.model, request.training_file, request.validation_file, request.suffix, seed,
                json.dumps(request.metadata) if request.metadata is not None else None,
                request.requested_hyperparameters().model_dump_json(), request.lora.model_dump_json(),
                "validating_files", int(time.time()),
            ),
        )
        job = self.find(job_id)
        assert job is not None
        return job

    def get(self, tenant: str, job_id: str) -> FineTuningJob | None:
        row = self.db.one("SELECT * FROM fine_tuning_jobs WHERE id = ? AND tenant = ?", (job_id, tenant))
        return _job(row) if row else None

    def find(self, job_id: str) -> FineTuningJob | None:
        """Any tenant's job: for the trainer, never for a request."""
        row = self.db.one("SELECT * FROM fine_tuning_jobs WHERE id = ?", (job_id,))
        return _job(row) if row else None

    def list(self, tenant: str, *, limit: int, after: str | None) -> tuple[list[FineTuningJob], bool]:
        rows, has_more = self.db.page("fine_tuning_jobs", {"tenant": tenant}, owner="tenant", limit=limit, after=after)
        return [_job(row) for row in rows], has_more

    def active(self, tenant: str) -> int:
        """How many of the tenant's jobs are validating, queued or running."""
        row = self.db.one("SELECT COUNT(*) AS active FROM fine_tuning_jobs WHERE tenant = ? AND status IN "
                          "('validating_files', 'queued', 'running')", (tenant,))
        return row["active"] if row else 0

    def with_status(self, *statuses: JobStatus) -> list[FineTuningJob]:
        """Every tenant's jobs in these states, oldest first."""
        marks = ", ".join("?" for _ in statuses)
        return [_job(row) for row in self.db.query(
            f"SELECT * FROM fine_tuning_jobs WHERE status IN ({marks}) ORDER BY seq", statuses
        )]

    def status(self, job_id: str) -> JobStatus | None:
        row = self.db.one("SELECT status FROM fine_tuning_jobs WHERE id = ?", (job_id,))
        return row["status"] if row else None

    def update(self, job_id: str, *, when: Sequence[JobStatus] | None = None, **fields: Any) -> bool:
        """Set `fields` (a status among them, maybe), only while the job is in one of `when`.

        True if the row changed; False when another change (a cancel) came first.
        """
        assert fields and set(fields) <= _UPDATABLE, fields
        values = [_column(name, value) for name, value in fields.items()]
        sql = f"UPDATE fine_tuning_jobs SET {', '.join(f'{name} = ?' for name in fields)} WHERE id = ?"
        params: list[Any] = [*values, job_id]
        if when is not None:
            sql += f" AND status IN ({', '.join('?' for _ in when)})"
            params += list(when)
        return self.db.execute(sql, params) > 0

    def finish(self, job_id: str, status: JobStatus, *, error: JobError | None = None, **fields: Any) -> bool:
        """Move an active job to a final status (succeeded, failed, cancelled)."""
        assert status in TERMINAL
        return self.update(
            job_id, when=("validating_files", "queued", "running"), status=status, finished_at=int(time.time()),
            estimated_finish=None, error=error, **fields,
        )

    # -- events ------------------------------------------------------------------------------------
    def add_event(
        self, job_id: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None,
        type: str = "message",
    ) -> None:
        self.db.execute(
            "INSERT INTO fine_tuning_events (id, job_id, created_at, level, message, data, type)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (f"ftevent-{secrets.token_hex(12)}", job_id, int(time.time()), level, message, json.dumps(data or {}),
             type),
        )

    def events(self, job_id: str, *, limit: int, after: str | None) -> tuple[list[FineTuningJobEvent], bool]:
        """A page of the job's events, newest first (the caller has checked the job is the tenant's)."""
        rows, has_more = self.db.page(
            "fine_tuning_events", {"job_id": job_id}, owner="job_id", limit=limit, after=after
        )
        events = [
            FineTuningJobEvent(
                id=row["id"], created_at=row["created_at"], level=row["level"], message=row["message"],
                data=json.loads(row["data"]), type=row["type"],
            )
            for row in rows
        ]
        return events, has_more


def _column(name: str, value: Any) -> Any:
    if isinstance(value, (Hyperparameters, JobError)):
        return value.model_dump_json()
    return value


def _job(row: Row) -> FineTuningJob:
    hyperparameters = Hyperparameters.model_validate_json(row["hyperparameters"])
    return FineTuningJob(
        id=row["id"],
        created_at=row["created_at"],
        error=JobError.model_validate_json(row["error"]) if row["error"] else None,
        fine_tuned_model=row["fine_tuned_model"],
        finished_at=row["finished_at"],
        hyperparameters=hyperparameters,
        model=row["model"],
        organization_id=row["tenant"],
        seed=row["seed"],
        status=row["status"],
        trained_tokens=row["trained_tokens"],
        training_file=row["training_file"],
        validation_file=row["validation_file"],
        estimated_finish=row["estimated_finish"],
        metadata=json.loads(row["metadata"]) if row["metadata"] else None,
        method=Method(type="supervised", supervised=SupervisedMethod(hyperparameters=hyperparameters)),
        user_provided_suffix=row["suffix"],
        lora=LoraOptions.model_validate_json(row["lora"]),
    )
