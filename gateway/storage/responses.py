"""Stored Responses (`POST /v1/responses` with `store`, the default), per tenant, in the gateway's database.

A stored response keeps its JSON body (what `GET /v1/responses/{id}` returns), its own input
items (`GET .../input_items`) and the whole conversation up to and including its output, so a
later request's `previous_response_id` continues from it without walking a chain. Another
tenant's id, a deleted one and one created with `store: false` all find nothing (404).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from gateway.storage.database import Database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    body TEXT NOT NULL,
    input TEXT NOT NULL,
    conversation TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_tenant ON responses (tenant, seq);
"""


@dataclass(frozen=True)
class StoredResponse:
    id: str
    body: dict[str, Any]
    input: list[dict[str, Any]]  # this request's own input items
    conversation: list[dict[str, Any]]  # every item so far: earlier turns, this input, this output


class ResponseStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.db.register(_SCHEMA)

    def save(
        self, tenant: str, body: dict[str, Any], input_items: list[dict[str, Any]], conversation: list[dict[str, Any]]
    ) -> None:
        self.db.execute(
            "INSERT INTO responses (id, tenant, created_at, body, input, conversation) VALUES (?, ?, ?, ?, ?, ?)",
            (body["id"], tenant, int(time.time()), json.dumps(body), json.dumps(input_items), json.dumps(conversation)),
        )

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        row = self.db.one(
            "SELECT id, body, input, conversation FROM responses WHERE id = ? AND tenant = ?", (response_id, tenant)
        )
        if row is None:
            return None
        return StoredResponse(row["id"], json.loads(row["body"]), json.loads(row["input"]), json.loads(row["conversation"]))

    def delete(self, tenant: str, response_id: str) -> bool:
        if not self.db.path.exists():
            return False
        return self.db.execute("DELETE FROM responses WHERE id = ? AND tenant = ?", (response_id, tenant)) > 0
