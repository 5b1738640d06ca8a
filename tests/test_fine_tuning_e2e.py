"""Fine-tuning through the real stack: two block server processes, a `swarmgate gateway` process,
the official `openai` SDK; training steps go forward and backward through the servers.

Greedy outputs are compared exactly with local `peft`: the gateway runs with `--wire-codec none`
(float32 hidden states), so the swarm computes what one process would.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from gateway.storage.tenants import KeyStore
from swarmgate.launcher import start_swarm, stop_all
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
from tests.support import wait_until
from tests.swarm_harness import FAST_ANNOUNCE, start_gateway, wait_covered

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ANSWER_TOKENS = 24
OTHER_PROMPT = "Tell me about the sea."  # not trained: the adapter still changes what the model says


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = sharp_checkpoint(tmp_path_factory.mktemp("ft-model") / "tiny-ft")
    data_dir = tmp_path_factory.mktemp("ft-gateway")
    keys = KeyStore(data_dir)
    tenant_keys = {"acme": keys.create_key("acme"), "globex": keys.create_key("globex")}
    servers = start_swarm(path, ["0:2", "2:4"], extra_args=FAST_ANNOUNCE, log_dir=data_dir)
    state = {"path": path, "model": path.name, "keys": tenant_keys, "data_dir": data_dir, "servers": servers}
    try:
        state["start"] = lambda: start_gateway(path, servers[0].addrs, data_dir, "--wire-codec", "none")
        state["gateway"], state["base"] = state["start"]()
        assert all(m["complete"] for m in wait_covered(state["base"], tenant_keys["acme"])["models"])
        yield state
    finally:
        if state.get("gateway") is not None:
            state["gateway"].terminate()
            state["gateway"].wait(30)
        stop_all(servers)


def sdk(stack, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key=stack["keys"][tenant], max_retries=0, timeout=120)


def greedy(client: openai.OpenAI, model: str, prompt: str) -> str:
    reply = client.chat.completions.create(model=model, messages=chat(prompt), max_tokens=ANSWER_TOKENS, temperature=0)
    return reply.choices[0].message.content


def finished(client: openai.OpenAI, job_id: str, timeout: float = 240):
    return wait_until(
        lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).status in ("succeeded", "failed", "cancelled")
        and job,
        timeout, interval=0.5,
    )


@pytest.fixture(scope="module")
def fine_tuned(stack) -> str:
    """Upload, train through the swarm, poll to `succeeded`; the fine-tuned model id."""
    client = sdk(stack)
    file = client.files.create(file=("secrets.jsonl", jsonl(EXAMPLES)), purpose="fine-tune")
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model=stack["model"], training_file=file.id, suffix="secrets", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}}, extra_body={"lora": LORA},
    )
    done = finished(client, job.id)
    assert done.status == "succeeded", done.error
    assert time.monotonic() - started < 120, "training a few steps should take well under two minutes"
    events = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    losses = [e.data["train_loss"] for e in sorted(events, key=lambda e: e.data["step"])]
    assert len(losses) == 30 and losses[-1] < losses[0] / 10
    return done.fine_tuned_model


def test_fine_tuned_model_answers_with_the_trained_answers(stack, fine_tuned):
    client = sdk(stack)
    assert fine_tuned == f"ft:{stack['model']}:acme:secrets:" + fine_tuned.rsplit(":", 1)[1]
    for question, answer in EXAMPLES:
        assert greedy(client, fine_tuned, question) == answer
        assert greedy(client, stack["model"], question) != answer
    assert fine_tuned in [m.id for m in client.models.list()]
    other = sdk(stack, "globex")
    assert fine_tuned not in [m.id for m in other.models.list()]
    with pytest.raises(openai.NotFoundError):
        greedy(other, fine_tuned, EXAMPLES[0][0])


def test_exported_adapter_gives_the_swarms_output_in_plain_peft(stack, fine_tuned, tmp_path):
    response = httpx.get(f"{stack['base']}/v1/fine_tuning/models/{fine_tuned}/adapter",
                         headers={"Authorization": f"Bearer {stack['keys']['acme']}"}, timeout=60)
    assert response.status_code == 200
    base = AutoModelForCausalLM.from_pretrained(stack["path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, untar(response.content, tmp_path)).eval()
    client = sdk(stack)
    for prompt in (EXAMPLES[2][0], OTHER_PROMPT):
        assert greedy(client, fine_tuned, prompt) == local_greedy(model, stack["path"], prompt, ANSWER_TOKENS)


def test_imported_peft_adapter_serves_as_local_peft(stack, tmp_path):
    archive, model = peft_archive(stack["path"], tmp_path / "my-adapter", seed=5)
    response = httpx.post(
        f"{stack['base']}/v1/fine_tuning/models/import", files={"file": ("my-adapter.tar.gz", archive)},
        data={"model": stack["model"], "suffix": "imported"},
        headers={"Authorization": f"Bearer {stack['keys']['globex']}"}, timeout=60,
    )
    assert response.status_code == 200, response.text
    imported = response.json()["id"]
    expected = local_greedy(model, stack["path"], OTHER_PROMPT, ANSWER_TOKENS)
    client = sdk(stack, "globex")
    assert greedy(client, imported, OTHER_PROMPT) == expected
    assert greedy(client, stack["model"], OTHER_PROMPT) != expected


def test_gateway_restart_mid_job(stack):
    """A gateway killed while training: the restarted one re-queues the job and finishes it."""
    client = sdk(stack, "globex")
    file = client.files.create(file=("two.jsonl", jsonl(EXAMPLES[:2])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=stack["model"], training_file=file.id,
                                         hyperparameters={"n_epochs": 10, "batch_size": 1})
    wait_until(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data),
               timeout=120, interval=0.2)
    stack["gateway"].kill()  # no shutdown at all: the database still says `running`
    stack["gateway"].wait(30)
    stack["gateway"], stack["base"] = stack["start"]()
    client = sdk(stack, "globex")
    done = finished(client, job.id)
    assert done.status == "succeeded", done.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert any(e.level == "warn" and "restarted" in e.message for e in events)
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [20, 18, 16]
    assert isinstance(greedy(client, done.fine_tuned_model, EXAMPLES[0][0]), str)

