"""Files and fine-tuning APIs against an in-process backend (the model's spans run locally).

The backend computes exactly what block servers do (`BlockSpan` with per-request LoRA, forward
and backward), so jobs really train and fine-tuned models really answer; the swarm itself is
covered by test_fine_tuning_e2e.py. The official `openai` SDK drives the API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters import create_adapter
from blocks.head import ModelHead
from gateway.app import create_app
from gateway.settings import Settings
from gateway.fine_tuning.sft import IGNORE, LoraOptimizer, micro_batches, tokenize
from gateway.storage.tenants import KeyStore
from gateway.fine_tuning.training_data import ChatExample
from tests.fine_tuning_support import (
    EXAMPLES,
    HYPERPARAMETERS,
    LORA,
    chat,
    jsonl,
    local_greedy,
    peft_archive,
    sharp_checkpoint,
    untar,
)
from tests.support import LocalBackend, serve, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # real jobs through a real uvicorn

MODEL = "tiny-llama"
ANSWER_TOKENS = 24


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharp_checkpoint(tmp_path_factory.mktemp("ft") / MODEL)


@pytest.fixture(scope="module")
def backend(checkpoint: Path) -> LocalBackend:
    return LocalBackend(checkpoint, MODEL)


@pytest.fixture(autouse=True)
def _reset_backend(backend: LocalBackend) -> Iterator[None]:
    yield
    backend.reset()


@pytest.fixture(scope="module")
def head_loader(checkpoint: Path):
    head = ModelHead(checkpoint)
    return lambda path: head


def make_app(checkpoint: Path, backend: LocalBackend, head_loader, data_dir: Path):
    settings = Settings(models={MODEL: checkpoint}, data_dir=data_dir, max_upload_bytes=100_000)
    return create_app(settings, backend, head_loader=head_loader)


@pytest.fixture(scope="module")
def stack(checkpoint, backend, head_loader, tmp_path_factory) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("data")
    keys = KeyStore(data_dir)
    tenants = {"acme": keys.create_key("acme"), "globex": keys.create_key("globex")}
    with serve(make_app(checkpoint, backend, head_loader, data_dir)) as base:
        yield {"base": base, "keys": tenants, "data_dir": data_dir}


def sdk(stack, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key=stack["keys"][tenant], max_retries=0, timeout=60)


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return sdk(stack)


def upload(client: openai.OpenAI, content: bytes, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, content), purpose="fine-tune").id


def wait_for_status(client: openai.OpenAI, job_id: str, *statuses: str, timeout: float = 120):
    return wait_until(lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).status in statuses and job, timeout)


def greedy(client: openai.OpenAI, model: str, prompt: str) -> str:
    reply = client.chat.completions.create(model=model, messages=chat(prompt), max_tokens=ANSWER_TOKENS, temperature=0)
    return reply.choices[0].message.content


def create_small_job(client: openai.OpenAI, file_id: str, **extra: Any):
    """A quick job: one epoch over the file."""
    return client.fine_tuning.jobs.create(model=MODEL, training_file=file_id, hyperparameters={"n_epochs": 1},
                                          **extra)


@pytest.fixture(scope="module")
def trained(stack) -> dict[str, Any]:
    """One real job, trained to memorise EXAMPLES (shared by several tests)."""
    client = sdk(stack)
    training = upload(client, jsonl(EXAMPLES))
    validation = upload(client, jsonl(EXAMPLES[:2]), "valid.jsonl")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=training, validation_file=validation, suffix="secrets", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
        metadata={"team": "blue"}, extra_body={"lora": LORA},
    )
    assert job.status == "validating_files" and job.seed == 7
    done = wait_for_status(client, job.id, "succeeded", "failed")
    assert done.status == "succeeded", done.error
    return {"job": done, "created": job, "training": training, "validation": validation}


# --- files ----------------------------------------------------------------------------------------


def test_file_upload_list_retrieve_content_delete(client):
    content = jsonl(EXAMPLES)
    file = client.files.create(file=("data.jsonl", content), purpose="fine-tune")
    assert file.id.startswith("file-") and file.object == "file" and file.purpose == "fine-tune"
    assert file.bytes == len(content) and file.filename == "data.jsonl" and file.status == "processed"
    assert client.files.retrieve(file.id) == file
    assert file.id in [f.id for f in client.files.list()]
    assert client.files.content(file.id).content == content
    deleted = client.files.delete(file.id)
    assert deleted.id == file.id and deleted.deleted and deleted.object == "file"
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(file.id)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"\n  \n", "empty"),
        (jsonl(EXAMPLES[:1]) + b'{"messages": [}\n', "line 2: invalid JSON"),
        (jsonl(EXAMPLES[:2]) + b'{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}',
         "line 3: messages[0].role: Field required"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "line 1: messages[0].role"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "line 1: needs at least one assistant message"),
        (b'{"messages": []}', "line 1: messages"),
        (b'{"prompt": "a", "completion": "b"}', "line 1: messages: Field required"),
        (b'[1, 2]\n"x"', "line 1: expected a JSON object"),
        (b'{"messages": [{"role": "user", "content": "hi", "tool_calls": []}, {"role": "assistant", "content": "x"}]}',
         "line 1: messages[0].tool_calls: unsupported field"),
        (b"\xff\xfe\n", "line 1: not valid UTF-8"),
        (b"[" * 50_000, "line 1: JSON nested too deeply"),
    ],
)
def test_bad_training_files_are_400s_naming_the_line(client, content, expected):
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", content), purpose="fine-tune")
    assert expected in refused.value.body["message"], refused.value.body
    assert refused.value.body["param"] == "file"


def test_several_bad_lines_are_all_named(client):
    content = b'{"messages": 1}\n' + jsonl(EXAMPLES[:1]) + b"nope\n" + b"[]\n"
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", content), purpose="fine-tune")
    message = refused.value.body["message"]
    assert "line 1:" in message and "line 3:" in message and "line 4:" in message and "line 2:" not in message


def test_upload_purpose_and_size_limits(client, stack):
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("a.jsonl", jsonl(EXAMPLES)), purpose="assistants")
    assert purpose.value.body["param"] == "purpose"
    with pytest.raises(openai.APIStatusError) as large:
        client.files.create(file=("big.jsonl", jsonl(EXAMPLES) * 2000), purpose="fine-tune")
    assert large.value.status_code == 413 and "limit" in large.value.body["message"]
    missing = httpx.post(stack["base"] + "/v1/files", data={"purpose": "fine-tune"},
                         headers={"Authorization": f"Bearer {stack['keys']['acme']}"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"


# --- training -------------------------------------------------------------------------------------


def test_tokenize_labels_only_trained_assistant_turns(checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    example = ChatExample.model_validate({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Skip me", "weight": 0},
        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Learn me"},
    ]})
    tokens = tokenize(tokenizer, example)
    trained = [label for label in tokens.labels if label != IGNORE]
    assert tokenizer.decode(trained) == "Learn me<|im_end|>\n"
    assert tokens.input_ids == list(tokenizer.apply_chat_template(example.chat(), tokenize=True, return_dict=False))


def test_gradient_accumulation_equals_one_batch(checkpoint, backend, head_loader):
    """Micro-batches of one row give the gradients of the whole batch in one pass."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    examples = [{"messages": [*chat(q), {"role": "assistant", "content": a}]} for q, a in EXAMPLES[:3]]
    batch = [tokenize(tokenizer, ChatExample.model_validate(example)) for example in examples]
    adapter = create_adapter(checkpoint, base_name=MODEL, r=4, alpha=8, seed=1)
    blocks = lambda hidden, lora: backend.differentiable_blocks(MODEL, hidden, lora)  # noqa: E731
    grads = []
    for max_tokens in (10_000, 1):
        assert len(micro_batches(batch, max_tokens)) == (1 if max_tokens > 1 else 3)
        optimizer = LoraOptimizer(adapter, head_loader(checkpoint), blocks, learning_rate=1e-3, total_steps=1,
                                  max_tokens=max_tokens, pad_id=0)
        optimizer.step(batch)  # the gradients stay until the next step
        grads.append({name: p.grad.clone() for name, p in optimizer.params.items()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4)


def test_job_trains_and_the_model_answers(client, stack, trained):
    job = trained["job"]
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-") and job.organization_id == "acme"
    assert job.fine_tuned_model == f"ft:{MODEL}:acme:secrets:{job.id}"
    assert job.hyperparameters.model_dump() == {"n_epochs": 15, "batch_size": 2, "learning_rate_multiplier": 50.0}
    assert job.method.type == "supervised"
    assert job.method.supervised.hyperparameters.model_dump() == job.hyperparameters.model_dump()
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.error is None
    assert job.metadata == {"team": "blue"} and job.integrations == [] and job.estimated_finish is None
    assert job.validation_file == trained["validation"] and job.user_provided_suffix == "secrets"
    assert job.model_extra["lora"] == {"r": 8, "alpha": 16.0, "target_modules": sorted(LORA["target_modules"])}

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    steps = sorted((e for e in events if e.type == "metrics" and "train_loss" in e.data), key=lambda e: e.data["step"])
    assert [e.data["step"] for e in steps] == list(range(1, 31))
    assert all(e.object == "fine_tuning.job.event" and e.level == "info" for e in steps)
    assert steps[-1].data["train_loss"] < steps[0].data["train_loss"] / 10
    validation = sorted((e for e in events if "full_valid_loss" in e.data), key=lambda e: e.data["step"])
    assert [e.data["epoch"] for e in validation] == list(range(1, 16))
    assert validation[-1].data["valid_loss"] < validation[0].data["valid_loss"] / 10
    messages = [e.message for e in events]
    assert "Fine-tuning job started" in messages and "The job has successfully completed" in messages

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [30, 28, 26]  # the last three epochs'
    for checkpoint in checkpoints:
        assert checkpoint.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{checkpoint.step_number}"
        assert checkpoint.id.startswith("ftckpt-") and checkpoint.fine_tuning_job_id == job.id
    assert checkpoints[0].metrics.full_valid_loss is not None and checkpoints[0].metrics.train_loss is not None

    for question, answer in EXAMPLES:
        assert greedy(client, job.fine_tuned_model, question) == answer
        assert greedy(client, MODEL, question) != answer
    assert greedy(client, checkpoints[0].fine_tuned_model_checkpoint, EXAMPLES[0][0]) == EXAMPLES[0][1]
    streamed = client.chat.completions.create(model=job.fine_tuned_model, messages=chat(EXAMPLES[1][0]),
                                              max_tokens=ANSWER_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == EXAMPLES[1][1]
    models = [m.id for m in client.models.list()]
    assert models[0] == MODEL and job.fine_tuned_model in models
    assert checkpoints[0].fine_tuned_model_checkpoint not in models
    assert client.models.retrieve(job.fine_tuned_model).owned_by == "acme"


def test_same_seed_same_adapter(client, trained, stack):
    """Seeded jobs are reproducible: a second identical job exports the identical adapter."""
    job = trained["job"]
    again = client.fine_tuning.jobs.create(
        model=MODEL, training_file=trained["training"], validation_file=trained["validation"], suffix="secrets",
        seed=7, method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
        extra_body={"lora": LORA},
    )
    again = wait_for_status(client, again.id, "succeeded", "failed")
    assert again.status == "succeeded", again.error
    assert again.trained_tokens == job.trained_tokens
    http = httpx.Client(base_url=stack["base"], headers={"Authorization": f"Bearer {stack['keys']['acme']}"})
    archives = [http.get(f"/v1/fine_tuning/models/{m}/adapter").content
                for m in (job.fine_tuned_model, again.fine_tuned_model)]
    tensors = [untar(archive, Path(stack["data_dir"]) / f"unpacked-{i}") / "adapter_model.safetensors"
               for i, archive in enumerate(archives)]
    assert tensors[0].read_bytes() == tensors[1].read_bytes()


def test_exported_adapter_gives_the_same_output_in_plain_peft(client, stack, trained, checkpoint, tmp_path):
    job = trained["job"]
    response = httpx.get(f"{stack['base']}/v1/fine_tuning/models/{job.fine_tuned_model}/adapter",
                         headers={"Authorization": f"Bearer {stack['keys']['acme']}"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    folder = untar(response.content, tmp_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), folder)
    for question, answer in EXAMPLES:
        assert local_greedy(model.eval(), checkpoint, question, ANSWER_TOKENS) == answer


def test_imported_adapters_serve_as_peft_does_and_concurrently(client, stack, checkpoint, tmp_path, backend):
    archives = [peft_archive(checkpoint, tmp_path / f"adapter-{seed}", seed) for seed in (1, 2)]
    imported = []
    for tenant, (archive, _) in zip(("acme", "globex"), archives):
        response = httpx.post(
            f"{stack['base']}/v1/fine_tuning/models/import", files={"file": ("adapter.tar.gz", archive)},
            data={"model": MODEL, "suffix": "mine"}, headers={"Authorization": f"Bearer {stack['keys'][tenant]}"},
        )
        assert response.status_code == 200, response.text
        model = response.json()
        assert model["id"].startswith(f"ft:{MODEL}:{tenant}:mine:ftimport-") and model["owned_by"] == tenant
        imported.append(model["id"])
    prompts = ["Tell me a story.", "What is the weather like?"]
    expected = [local_greedy(peft_model, checkpoint, prompt, ANSWER_TOKENS)
                for (_, peft_model), prompt in zip(archives, prompts)]
    assert expected[0] != local_greedy(AutoModelForCausalLM.from_pretrained(checkpoint).eval(), checkpoint, prompts[0],
                                       ANSWER_TOKENS)

    async def both() -> list[str]:
        clients = [openai.AsyncOpenAI(base_url=stack["base"] + "/v1", api_key=stack["keys"][t], max_retries=0)
                   for t in ("acme", "globex")]
        replies = await asyncio.gather(*(
            c.chat.completions.create(model=m, messages=chat(p), max_tokens=ANSWER_TOKENS, temperature=0)
            for c, m, p in zip(clients, imported, prompts)
        ))
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(both()) == expected
    assert len({adapter.digest for adapter in backend.adapters[-2:]}) == 2  # each request its own adapter


def test_import_refuses_what_the_swarm_cannot_serve(stack):
    headers = {"Authorization": f"Bearer {stack['keys']['acme']}"}
    bad = httpx.post(f"{stack['base']}/v1/fine_tuning/models/import", files={"file": ("a.tar.gz", b"not an archive")},
                     data={"model": MODEL}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_adapter"
    unknown = httpx.post(f"{stack['base']}/v1/fine_tuning/models/import", files={"file": ("a.tar.gz", b"x")},
                         data={"model": "nope"}, headers=headers)
    assert unknown.status_code == 404


def test_job_requests_refused_with_clear_400s_and_404s(client, stack):
    file_id = upload(client, jsonl(EXAMPLES))
    cases = [
        (dict(method={"type": "dpo", "dpo": {}}), openai.BadRequestError, "only 'supervised'"),
        (dict(method={"type": "reinforcement"}), openai.BadRequestError, "only 'supervised'"),
        (dict(hyperparameters={"n_epochs": 2}, method={"type": "supervised", "supervised": {}}),
         openai.BadRequestError, "not both"),
        (dict(hyperparameters={"n_epochs": 0}), openai.BadRequestError, "n_epochs"),
        (dict(hyperparameters={"batch_size": "big"}), openai.BadRequestError, "batch_size"),
        (dict(suffix="a:b"), openai.BadRequestError, "suffix"),
        (dict(integrations=[{"type": "wandb", "wandb": {"project": "x"}}]), openai.BadRequestError, "integrations"),
        (dict(extra_body={"lora": {"target_modules": ["lm_head"]}}), openai.BadRequestError, "unsupported modules"),
        (dict(model="no-such-model"), openai.NotFoundError, "no-such-model"),
        (dict(training_file="file-missing"), openai.NotFoundError, "file-missing"),
        (dict(validation_file="file-missing"), openai.NotFoundError, "file-missing"),
    ]
    for extra, error, text in cases:
        args = {"model": MODEL, "training_file": file_id} | extra
        with pytest.raises(error) as refused:
            client.fine_tuning.jobs.create(**args)
        assert text in refused.value.body["message"], (extra, refused.value.body)


def test_auto_hyperparameters_and_top_level_form(client):
    job = create_small_job(client, upload(client, jsonl(EXAMPLES)))
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == "auto"
    done = wait_for_status(client, job.id, "succeeded", "failed")
    assert done.status == "succeeded", done.error
    assert done.hyperparameters.model_dump() == {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0}
    assert done.model_extra["lora"]["r"] == 8 and done.model_extra["lora"]["target_modules"] == [
        "k_proj", "o_proj", "q_proj", "v_proj"]


def test_job_fails_clearly_on_examples_the_template_or_limits_refuse(client):
    long_answer = " ".join(["word"] * 3000)
    job = create_small_job(client, upload(client, jsonl([*EXAMPLES[:2], ("Long?", long_answer)])))
    failed = wait_for_status(client, job.id, "failed", "succeeded")
    assert failed.status == "failed" and failed.error.param == "training_file"
    assert "line 3" in failed.error.message and "tokens" in failed.error.message
    assert failed.error.code == "invalid_training_file" and failed.fine_tuned_model is None


def test_listing_pagination(client, stack):
    tenant = sdk(stack, "globex")  # few jobs of its own
    file_id = upload(tenant, jsonl(EXAMPLES[:1]))
    created = [create_small_job(tenant, file_id).id for _ in range(3)]
    for job_id in created:
        wait_for_status(tenant, job_id, "succeeded", "failed")
    first = tenant.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == created[::-1][:2] and first.has_more
    rest = tenant.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in rest.data] == created[:1] and not rest.has_more
    assert [j.id for j in tenant.fine_tuning.jobs.list(limit=2)][:3] == created[::-1]  # the SDK pages through
    events = tenant.fine_tuning.jobs.list_events(created[0], limit=2)
    assert events.has_more and len(events.data) == 2
    older = tenant.fine_tuning.jobs.list_events(created[0], limit=100, after=events.data[-1].id)
    assert older.data[-1].message.startswith("Validating training file")
    files = tenant.files.list(limit=1)
    assert files.has_more is False and [f.id for f in files.data] == [file_id]


def test_a_tenants_active_jobs_are_bounded(stack, backend):
    """Each job's validation and training take the gateway's shared worker threads and the one
    trainer: past `max_fine_tuning_jobs` (4) validating, queued or running, a tenant gets 429."""
    backend.train_delay = 0.05
    tenant = openai.OpenAI(base_url=stack["base"] + "/v1", api_key=KeyStore(stack["data_dir"]).create_key("initech"),
                           max_retries=0, timeout=60)
    other = sdk(stack, "globex")
    file_id = upload(tenant, jsonl(EXAMPLES))
    long = {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}
    jobs = [tenant.fine_tuning.jobs.create(model=MODEL, training_file=file_id, **long) for _ in range(4)]
    try:
        with pytest.raises(openai.RateLimitError) as refused:
            tenant.fine_tuning.jobs.create(model=MODEL, training_file=file_id, **long)
        assert "limit 4" in refused.value.body["message"]
        theirs = other.fine_tuning.jobs.create(model=MODEL, training_file=upload(other, jsonl(EXAMPLES)), **long)
        other.fine_tuning.jobs.cancel(theirs.id)  # another tenant's limit is its own
        tenant.fine_tuning.jobs.cancel(jobs.pop().id)
        jobs.append(tenant.fine_tuning.jobs.create(model=MODEL, training_file=file_id, **long))
    finally:
        for job in jobs:
            tenant.fine_tuning.jobs.cancel(job.id)


def test_cancel_stops_a_running_job(client, backend):
    backend.train_delay = 0.05
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=upload(client, jsonl(EXAMPLES)),
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    wait_until(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data))
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at and cancelled.fine_tuned_model is None
    time.sleep(0.5)  # the worker stops before its next step
    steps = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    time.sleep(0.5)
    assert [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"] == steps
    assert len(steps) < 200
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # idempotent
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_cancel_a_finished_job_is_400(client, trained):
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(trained["job"].id)


def test_a_failed_step_is_retried(client, backend):
    backend.train_failures = 1
    job = create_small_job(client, upload(client, jsonl(EXAMPLES[:1])))
    done = wait_for_status(client, job.id, "succeeded", "failed", timeout=60)
    assert done.status == "succeeded", done.error
    warnings = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.level == "warn"]
    assert len(warnings) == 1 and "retrying" in warnings[0].message


def test_tenants_see_only_their_own(stack, trained):
    acme, globex = sdk(stack, "acme"), sdk(stack, "globex")
    job = trained["job"]
    for call in (
        lambda: globex.files.retrieve(trained["training"]),
        lambda: globex.files.content(trained["training"]),
        lambda: globex.files.delete(trained["training"]),
        lambda: globex.fine_tuning.jobs.retrieve(job.id),
        lambda: globex.fine_tuning.jobs.cancel(job.id),
        lambda: globex.fine_tuning.jobs.list_events(job.id),
        lambda: globex.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: globex.models.retrieve(job.fine_tuned_model),
        lambda: globex.chat.completions.create(model=job.fine_tuned_model, messages=chat("hi"), max_tokens=2),
        lambda: globex.completions.create(model=job.fine_tuned_model, prompt="hi", max_tokens=2),
        lambda: globex.fine_tuning.jobs.create(model=MODEL, training_file=trained["training"]),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert trained["training"] not in [f.id for f in globex.files.list()]
    assert job.id not in [j.id for j in globex.fine_tuning.jobs.list()]
    assert job.fine_tuned_model not in [m.id for m in globex.models.list()]
    exported = httpx.get(f"{stack['base']}/v1/fine_tuning/models/{job.fine_tuned_model}/adapter",
                         headers={"Authorization": f"Bearer {stack['keys']['globex']}"})
    assert exported.status_code == 404
    assert acme.files.retrieve(trained["training"]).id == trained["training"]  # still there for its owner


def test_restart_mid_job_requeues_and_finishes(checkpoint, backend, head_loader, tmp_path):
    """A gateway stopped while a job trains finds it `running` at start: re-queued, then trained."""
    key = KeyStore(tmp_path).create_key("acme")
    backend.train_delay = 0.05
    with serve(make_app(checkpoint, backend, head_loader, tmp_path)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=upload(client, jsonl(EXAMPLES)),
                                             hyperparameters={"n_epochs": 3, "batch_size": 1})
        wait_until(lambda: len(client.fine_tuning.jobs.checkpoints.list(job.id).data) >= 1)
    backend.train_delay = 0.0
    with serve(make_app(checkpoint, backend, head_loader, tmp_path)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        done = wait_for_status(client, job.id, "succeeded", "failed")
        assert done.status == "succeeded", done.error
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        restarted = [e for e in events if e.level == "warn" and "restarted" in e.message]
        assert len(restarted) == 1
        assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [12, 8, 4]
        assert greedy(client, done.fine_tuned_model, "Hello") is not None
