"""The fine-tuning file format: JSONL, one chat example per line, as OpenAI's chat fine-tuning.

Each line is ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``
with at least one assistant message to learn from; an assistant message may carry
``"weight": 0`` to keep it out of the loss (OpenAI's multi-turn weighting). Uploads are checked
here, whole, before anything is stored, and every error names its line, so a tenant fixes a
file in one round. Blank lines are skipped. Tools and function calls are refused, not dropped.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_REPORTED_ERRORS = 5


class ExampleMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)
    name: str | None = None
    weight: Literal[0, 1] | None = None

    @model_validator(mode="after")
    def _weight_only_on_assistant(self) -> ExampleMessage:
        if self.weight is not None and self.role != "assistant":
            raise ValueError("only assistant messages may carry a weight")
        return self

    @property
    def trained(self) -> bool:
        return self.role == "assistant" and self.weight != 0


class ChatExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[ExampleMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _something_to_learn(self) -> ChatExample:
        if not any(message.trained for message in self.messages):
            raise ValueError("needs at least one assistant message (with a weight other than 0)")
        return self

    def chat(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


class TrainingFileError(ValueError):
    """A file that is not valid training data; the message names the offending lines."""


def parse_examples(data: bytes) -> list[tuple[int, ChatExample]]:
    """Every example of a JSONL file with its line number, or a TrainingFileError naming up to 5 bad lines."""
    examples: list[tuple[int, ChatExample]] = []
    errors: list[str] = []
    bad = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            examples.append((number, _parse_line(raw)))
        except ValueError as error:
            bad += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(f"line {number}: {error}")
    if errors:
        more = f" (and {bad - len(errors)} more invalid lines)" if bad > len(errors) else ""
        raise TrainingFileError("Invalid training data: " + "; ".join(errors) + more)
    if not examples:
        raise TrainingFileError("The file is empty: expected JSONL lines of {\"messages\": [...]}.")
    return examples


def _parse_line(raw: bytes) -> ChatExample:
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError('expected a JSON object {"messages": [...]}')
    try:
        return ChatExample.model_validate(value)
    except ValidationError as error:
        raise ValueError(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    """Pydantic's first error in a line's terms: `messages[1].role: Input should be ...`."""
    first = error.errors()[0]
    path = ""
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unsupported field (only messages with role, content, name and weight are supported)"
    return f"{path}: {message}" if path else message
