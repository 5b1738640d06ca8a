"""The fine-tuning worker: validates jobs' files, then trains one job at a time.

It lives in asyncio tasks started and stopped with the app's lifespan. The event loop only
drives: it moves jobs between statuses (conditional updates, so a cancel always wins or loses
cleanly), writes events, and checks for a cancel between steps; tokenization, every optimizer
step (head compute, and the blocks through the swarm via the backend) and adapter writes run in
worker threads. A job's adapter is written (atomically) and registered before the job is marked
`succeeded`, so a succeeded job's model always exists.

After a crash or a restart, jobs found `running` go back to `queued` with a warning event and
train again from their first step with the same seed (their partial checkpoints are removed):
simpler than resuming mid-epoch, and nothing is ever left silently `running`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from anyio.to_thread import run_sync
from tqdm import tqdm

from adapters import create_adapter
from gateway.backend import InferenceBackend
from gateway.storage.file_store import FileStore
from gateway.storage.fine_tuned import FineTunedModels, checkpoint_name, model_id
from gateway.protocol.fine_tuning_schemas import FineTuningJob, JobError
from gateway.storage.jobs import JobStore
from gateway.models import ModelRegistry, ServedModel
from gateway.settings import Settings
from gateway.fine_tuning.sft import LoraOptimizer, Metrics, TokenizedExample, resolve_hyperparameters, steps_per_epoch, tokenize
from gateway.fine_tuning.training_data import TrainingFileError, parse_examples

log = logging.getLogger(__name__)

STEP_ATTEMPTS = 3  # a step whose swarm call fails (a server died mid-step) is redone this many times in all
RETRY_DELAY = 2.0
KEPT_CHECKPOINTS = 3


class DataError(Exception):
    """A job's file cannot be trained on; `param` names which."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class _Stopped(Exception):
    """The job left `running` (cancelled) while it trained."""


@dataclass(frozen=True)
class TrainingData:
    train: list[TokenizedExample]
    validation: list[TokenizedExample]


class Trainer:
    def __init__(
        self, *, settings: Settings, jobs: JobStore, files: FileStore, fine_tuned: FineTunedModels,
        models: ModelRegistry, backend: InferenceBackend,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.files = files
        self.fine_tuned = fine_tuned
        self.models = models
        self.backend = backend
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._recover()
        for job in self.jobs.with_status("validating_files"):
            self.submit(job)
        self._spawn(self._run())

    async def stop(self) -> None:
        """Cancel the worker; a job it was training stays `running` and is re-queued at the next start."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def submit(self, job: FineTuningJob) -> None:
        """Validate a new job's files in the background; it joins the queue if they pass."""
        self._spawn(self._validate(job))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recover(self) -> None:
        for job in self.jobs.with_status("running"):
            await run_sync(self.fine_tuned.remove_job, job.organization_id, job.id)
            if self.jobs.update(job.id, when=("running",), status="queued", trained_tokens=None, estimated_finish=None):
                self.jobs.add_event(
                    job.id, "The gateway restarted while this job was training: it is queued again and will "
                    "train from its first step.", level="warn",
                )
                log.warning("re-queued fine-tuning job %s, interrupted by a restart", job.id)

    # -- validation ------------------------------------------------------------------------------
    async def _validate(self, job: FineTuningJob) -> None:
        self.jobs.add_event(job.id, f"Validating training file: {job.training_file}"
                            + (f" and validation file: {job.validation_file}" if job.validation_file else ""))
        try:
            data = await run_sync(self._load, job)
        except DataError as error:
            self._fail(job, error.param, str(error), code=f"invalid_{error.param}")
            return
        except Exception as error:
            log.exception("validating fine-tuning job %s failed", job.id)
            self._fail(job, None, f"Validating the files failed: {error}", code="validation_failed")
            return
        hyperparameters = resolve_hyperparameters(job.hyperparameters, len(data.train))
        if self.jobs.update(job.id, when=("validating_files",), status="queued", hyperparameters=hyperparameters):
            self.jobs.add_event(job.id, "Files validated, moving job to queued state")
            self._wake.set()

    def _load(self, job: FineTuningJob) -> TrainingData:
        """Read and tokenize the job's files (worker thread); DataError names the file and line."""
        if job.model not in self.settings.models:
            raise DataError(f"The model {job.model} is no longer served by this gateway.", "model")
        model = self.models.get(job.model)
        files = [("training_file", job.training_file)]
        if job.validation_file:
            files.append(("validation_file", job.validation_file))
        loaded = [self._examples(job.organization_id, file_id, param, model) for param, file_id in files]
        return TrainingData(loaded[0], loaded[1] if len(loaded) > 1 else [])

    def _examples(self, tenant: str, file_id: str, param: str, model: ServedModel) -> list[TokenizedExample]:
        content = self.files.read(tenant, file_id)
        if content is None:
            raise DataError(f"The file {file_id} no longer exists.", param)
        try:
            examples = parse_examples(content)
        except TrainingFileError as error:
            raise DataError(f"{file_id}: {error}", param) from None
        limit = min(self.settings.fine_tune_max_tokens, model.context_length)
        tokenized = []
        for line, example in examples:
            try:
                tokens = tokenize(model.tokenizer, example)
            except ValueError as error:
                raise DataError(f"{file_id}, line {line}: {error}", param) from None
            if len(tokens.input_ids) > limit:
                raise DataError(
                    f"{file_id}, line {line}: the example has {len(tokens.input_ids)} tokens; at most {limit} are "
                    "allowed per example", param,
                )
            tokenized.append(tokens)
        return tokenized

    # -- training --------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self._run_next()
            except Exception:  # e.g. the database locked for too long: the worker must survive it
                log.exception("the fine-tuning worker failed; retrying")
                await asyncio.sleep(RETRY_DELAY)

    async def _run_next(self) -> None:
        queued = self.jobs.with_status("queued")
        if not queued:
            await self._wake.wait()
            self._wake.clear()
            return
        job = queued[0]
        if not self.jobs.update(job.id, when=("queued",), status="running"):
            return  # cancelled just now
        self.jobs.add_event(job.id, "Fine-tuning job started")
        try:
            await self._train(job)
        except _Stopped:
            log.info("fine-tuning job %s stopped: %s", job.id, self.jobs.status(job.id))
        except DataError as error:
            self._fail(job, error.param, str(error), code=f"invalid_{error.param}")
        except Exception as error:
            log.exception("fine-tuning job %s failed", job.id)
            self._fail(job, None, f"Training failed: {error}", code="training_failed")

    async def _train(self, job: FineTuningJob) -> None:
        data = await run_sync(self._load, job)  # also checks the model is still served
        tenant, model = job.organization_id, await run_sync(self.models.get, job.model)  # evicted meanwhile: loads
        hp = job.hyperparameters  # resolved at validation
        assert hp.n_epochs != "auto" and hp.batch_size != "auto" and hp.learning_rate_multiplier != "auto"
        per_epoch = steps_per_epoch(len(data.train), hp.batch_size)
        total = per_epoch * hp.n_epochs
        initial = await run_sync(lambda: create_adapter(
            self.settings.models[job.model], base_name=job.model, r=job.lora.r, alpha=job.lora.alpha,
            target_modules=job.lora.target_modules, seed=job.seed,
        ))
        optimizer = LoraOptimizer(
            initial, model.head, lambda hidden, lora: self.backend.differentiable_blocks(job.model, hidden, lora),
            learning_rate=self.settings.fine_tune_learning_rate * hp.learning_rate_multiplier, total_steps=total,
            max_tokens=self.settings.fine_tune_max_tokens, pad_id=_pad_id(model), device=model.head.device,
        )
        order = torch.Generator().manual_seed(job.seed)
        step, trained_tokens, started = 0, 0, time.monotonic()
        with tqdm(total=total, desc=f"fine-tuning {job.id}", unit="step", file=sys.stderr, mininterval=1) as bar:
            for epoch in range(1, hp.n_epochs + 1):
                permutation = torch.randperm(len(data.train), generator=order).tolist()
                for first in range(0, len(permutation), hp.batch_size):
                    self._check_running(job)
                    batch = [data.train[i] for i in permutation[first : first + hp.batch_size]]
                    train = await self._step(job, optimizer, batch)
                    step, trained_tokens = step + 1, trained_tokens + train.tokens
                    self._report_step(job, step, total, train, started)
                    bar.update()
                    bar.set_postfix(loss=f"{train.loss:.4f}")
                valid = await run_sync(optimizer.evaluate, data.validation, abandon_on_cancel=True) \
                    if data.validation else None
                self._report_epoch(job, epoch, hp.n_epochs, step, valid)
                await self._checkpoint(job, optimizer, step, train, valid)
        self._check_running(job)
        name = model_id(job.model, tenant, job.user_provided_suffix, job.id)
        final = await run_sync(lambda: self.fine_tuned.add(
            tenant, name, job.model, optimizer.adapter(), name=job.id, kind="job", job_id=job.id,
        ))
        if not self.jobs.finish(job.id, "succeeded", fine_tuned_model=name, trained_tokens=trained_tokens):
            await run_sync(self.fine_tuned.remove, final)  # cancelled at the last moment
            raise _Stopped
        self.jobs.add_event(job.id, f"New fine-tuned model created: {name}")
        self.jobs.add_event(job.id, "The job has successfully completed")

    async def _step(self, job: FineTuningJob, optimizer: LoraOptimizer, batch: list[TokenizedExample]) -> Metrics:
        for attempt in range(1, STEP_ATTEMPTS + 1):
            try:
                return await run_sync(optimizer.step, batch, abandon_on_cancel=True)
            except Exception as error:
                if attempt == STEP_ATTEMPTS:
                    raise
                log.warning("fine-tuning job %s: step failed (%r), retrying", job.id, error)
                self.jobs.add_event(job.id, f"A training step failed ({error}); retrying it.", level="warn")
                await asyncio.sleep(RETRY_DELAY)
        raise AssertionError("unreachable")

    def _check_running(self, job: FineTuningJob) -> None:
        if self.jobs.status(job.id) != "running":
            raise _Stopped

    def _report_step(self, job: FineTuningJob, step: int, total: int, train: Metrics, started: float) -> None:
        self.jobs.add_event(
            job.id, f"Step {step}/{total}: training loss={train.loss:.4f}", type="metrics",
            data={"step": step, "total_steps": total, "train_loss": train.loss,
                  "train_mean_token_accuracy": train.accuracy},
        )
        elapsed = time.monotonic() - started
        self.jobs.update(job.id, when=("running",), estimated_finish=int(time.time() + elapsed / step * (total - step)))

    def _report_epoch(self, job: FineTuningJob, epoch: int, epochs: int, step: int, valid: Metrics | None) -> None:
        if valid is None:
            return
        self.jobs.add_event(
            job.id, f"Epoch {epoch}/{epochs}: validation loss={valid.loss:.4f}", type="metrics",
            data={"step": step, "epoch": epoch, "valid_loss": valid.loss, "valid_mean_token_accuracy": valid.accuracy,
                  "full_valid_loss": valid.loss, "full_valid_mean_token_accuracy": valid.accuracy},
        )

    async def _checkpoint(
        self, job: FineTuningJob, optimizer: LoraOptimizer, step: int, train: Metrics, valid: Metrics | None
    ) -> None:
        metrics: dict[str, Any] = {"step": step, "train_loss": train.loss, "train_mean_token_accuracy": train.accuracy}
        if valid is not None:
            metrics |= {"valid_loss": valid.loss, "valid_mean_token_accuracy": valid.accuracy,
                        "full_valid_loss": valid.loss, "full_valid_mean_token_accuracy": valid.accuracy}
        tenant = job.organization_id
        name = f"{model_id(job.model, tenant, job.user_provided_suffix, job.id)}:ckpt-step-{step}"

        def save() -> None:
            self.fine_tuned.add(tenant, name, job.model, optimizer.adapter(), name=checkpoint_name(job.id, step),
                                kind="checkpoint", job_id=job.id, step=step, metrics=metrics)
            self.fine_tuned.prune_checkpoints(job.id, KEPT_CHECKPOINTS)

        await run_sync(save)
        self.jobs.add_event(job.id, f"Checkpoint created at step {step}: {name}")

    def _fail(self, job: FineTuningJob, param: str | None, message: str, *, code: str) -> None:
        if self.jobs.finish(job.id, "failed", error=JobError(code=code, message=message, param=param)):
            self.jobs.add_event(job.id, message, level="error")


def _pad_id(model: ServedModel) -> int:
    """Any id works (padding is outside the loss and after every real token); the tokenizer's own if set."""
    pad = model.tokenizer.pad_token_id
    return pad if pad is not None else min(model.eos_token_ids, default=0)
