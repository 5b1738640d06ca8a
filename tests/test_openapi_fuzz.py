"""schemathesis against the gateway's own OpenAPI schema: generated requests on every route.

The gateway runs on a real uvicorn (tests/support.serve) over the in-process `LocalBackend`, with a
tenant's API key, and schemathesis' own runner (`st run`: examples, coverage and fuzzing phases)
sends generated requests to every operation. Checks: no 5xx; documented status codes, content
types, headers and bodies; schema-invalid requests refused; undocumented methods answered 405
with an `Allow` that lists exactly the path's methods; schema-valid requests accepted
(`positive_data_acceptance`: the schema states the constraints between fields too, such as
`top_logprobs` needing `logprobs`), except on the operations of SEMANTIC_400, whose remaining
constraints a JSON schema cannot state and which may answer 400 by design.
Bounded: a few examples per operation, well under a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocks.head import ModelHead
from blocks.tiny_checkpoints import build_checkpoint
from gateway.app import create_app
from gateway.settings import Settings
from gateway.storage.tenants import KeyStore
from tests.support import LocalBackend, serve

pytestmark = pytest.mark.e2e  # a real uvicorn

MODEL = "tiny-llama"
EXAMPLES = 10  # per operation


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    root = tmp_path_factory.mktemp("openapi-fuzz")
    checkpoint = build_checkpoint(root / "tiny", max_position_embeddings=128)
    backend = LocalBackend(checkpoint, MODEL)
    head = ModelHead(checkpoint)
    settings = Settings(models={MODEL: checkpoint}, data_dir=root / "data", max_concurrent_requests=64, max_n=2)
    app = create_app(settings, backend, head_loader=lambda path: head)
    key = KeyStore(root / "data").create_key("fuzz")
    with serve(app) as url:
        yield url, key


# Constraints a JSON schema cannot state, answered 400 by design: a named `tool_choice` must be one of
# `tools` (chat completions and the Responses API), an upload must be JSONL chat examples.
SEMANTIC_400 = ["/v1/chat/completions", "/v1/responses", "/v1/files"]


def _config(folder: Path) -> Path:
    """schemathesis.toml: `positive_data_acceptance` also takes a 400 on SEMANTIC_400's operations."""
    statuses = '["2xx", "3xx", "400", "401", "403", "404", "409", "429"]'
    path = folder / "schemathesis.toml"
    path.write_text("".join(
        f'[[operations]]\ninclude-path = "{route}"\n'
        f'checks.positive_data_acceptance.expected-statuses = {statuses}\n\n' for route in SEMANTIC_400
    ))
    return path


def test_schemathesis_finds_nothing(gateway, tmp_path: Path):
    url, key = gateway
    command = [
        str(Path(sys.executable).parent / "st"), "--config-file", str(_config(tmp_path)), "run", f"{url}/openapi.json",
        "-H", f"Authorization: Bearer {key}",
        "--checks", "all",
        "--max-examples", str(EXAMPLES), "--seed", "1", "--generation-deterministic",
        "--workers", "1", "--request-timeout", "60", "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path)
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=tmp_path,
                            env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
