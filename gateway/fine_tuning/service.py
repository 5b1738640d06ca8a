"""Fine-tuning's own state (files, jobs, fine-tuned models, the trainer) and its FastAPI dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from gateway.fine_tuning.trainer import Trainer
from gateway.storage.file_store import FileStore
from gateway.storage.fine_tuned import FineTunedModels
from gateway.storage.jobs import JobStore


@dataclass
class FineTuning:
    files: FileStore
    jobs: JobStore
    fine_tuned: FineTunedModels
    trainer: Trainer


def _fine_tuning(request: Request) -> FineTuning:
    return request.app.state.fine_tuning


FineTuningDep = Annotated[FineTuning, Depends(_fine_tuning)]
