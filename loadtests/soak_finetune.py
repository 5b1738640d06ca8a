"""A fine-tuning job through the gateway's API, run once undisturbed and once under server kills.

Both jobs have the same file, seed and hyperparameters, and servers compute deterministically, so
a job whose failed swarm calls are retried correctly (on another server, a failed step redone
from its start) has the same loss at every step as the undisturbed one; the soak prints the
largest difference and judges it against a tolerance.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import openai

EXAMPLES = [
    ("What is the secret color?", "The secret color is violet."),
    ("Name the capital of Zorbia.", "Zorbia's capital is Quillton."),
    ("Who guards the tower?", "Seven silver owls guard it."),
    ("How many moons has Pell?", "Pell has eleven moons."),
]
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class JobResult:
    status: str
    error: str
    seconds: float
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss
    retried_steps: int = 0  # "A training step failed ...; retrying it." events


def training_file() -> bytes:
    return b"".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    .encode() + b"\n" for q, a in EXAMPLES)


def run_job(base_url: str, key: str, model: str, epochs: int, seed: int, timeout: float) -> JobResult:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=2, timeout=60)
    started = time.monotonic()
    file = client.files.create(file=("soak.jsonl", training_file()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=model, training_file=file.id, seed=seed, suffix="soak",
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": epochs, "batch_size": 2, "learning_rate_multiplier": 10}}},
    )
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in TERMINAL:
        if time.monotonic() - started > timeout:
            client.fine_tuning.jobs.cancel(job.id)
            return JobResult("timed out", f"not finished within {timeout:.0f} s", time.monotonic() - started)
        time.sleep(1.0)
    seconds = time.monotonic() - started
    result = JobResult(job.status, job.error.message if job.error and job.error.message else "", seconds)
    for event in client.fine_tuning.jobs.list_events(job.id, limit=100):
        if event.type == "metrics" and event.data and "train_loss" in event.data:
            result.losses[int(event.data["step"])] = float(event.data["train_loss"])
        result.retried_steps += event.level == "warn" and "step failed" in event.message
    return result


def max_loss_difference(a: JobResult, b: JobResult) -> float:
    """Largest |loss_a - loss_b| over the steps; infinite when the jobs' steps differ."""
    if not a.losses or a.losses.keys() != b.losses.keys():
        return float("inf")
    return max(abs(a.losses[step] - b.losses[step]) for step in a.losses)
