"""Bodies of the Files and fine-tuning APIs, in OpenAI's shapes, plus swarmgate's LoRA extras.

Requests ignore unknown fields, as the rest of the API does; what is recognised but not
supported (DPO and reinforcement methods, integrations) is refused with a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from blocks.lora_weights import ALL_MODULES, ATTENTION_MODULES, MAX_RANK

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
SUFFIX_PATTERN = r"^[A-Za-z0-9_.-]+$"  # no ':' (it separates the parts of a model id)
MAX_SUFFIX = 64

# --- files ----------------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- fine-tuning jobs: requests ---------------------------------------------------------------------

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    """As requested ("auto" allowed), or as resolved once the training file is validated."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(ge=1, le=100)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=1000)] = "auto"


class SupervisedMethod(BaseModel):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"] = Field(
        json_schema_extra={"enum": ["supervised"]}, description="Only `supervised` is supported.")
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supervised_only(self) -> Method:
        if self.type != "supervised":
            raise ValueError(f"the '{self.type}' method is not supported; only 'supervised' fine-tuning is")
        return self


class LoraOptions(BaseModel):
    """swarmgate extension (`extra_body={"lora": {...}}`): the LoRA adapter a job trains."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, le=MAX_RANK, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ATTENTION_MODULES),
        min_length=1,
        description=f"Projections to adapt, among the base family's ({', '.join(ALL_MODULES)}); the default is "
        "Llama-family attention: Phi-3, BLOOM and Falcon bases name theirs (e.g. qkv_proj, query_key_value).",
        json_schema_extra={"items": {"type": "string", "enum": list(ALL_MODULES)}},
    )

    @field_validator("target_modules")
    @classmethod
    def _supported(cls, modules: list[str]) -> list[str]:
        if unknown := sorted(set(modules) - set(ALL_MODULES)):
            raise ValueError(f"unsupported modules {unknown}; choose among {', '.join(ALL_MODULES)}")
        return sorted(set(modules))


class CreateFineTuningJob(BaseModel):
    model: str = Field(json_schema_extra={"minLength": 1})
    training_file: str = Field(json_schema_extra={"minLength": 1})
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated by OpenAI in favour of `method`.")
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=MAX_SUFFIX, pattern=SUFFIX_PATTERN)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16
    )
    integrations: list[Any] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "array", "maxItems": 0}, {"type": "null"}]}, description="Not supported: absent, null or empty.")
    lora: LoraOptions = Field(default_factory=LoraOptions)

    @model_validator(mode="after")
    def _check(self) -> CreateFineTuningJob:
        if self.integrations:
            raise ValueError("integrations are not supported")
        if self.hyperparameters is not None and self.method is not None and self.method.supervised is not None:
            raise ValueError("give hyperparameters either in method.supervised or at the top level, not both")
        return self

    def requested_hyperparameters(self) -> Hyperparameters:
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


# --- fine-tuning jobs: responses ------------------------------------------------------------------


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str = Field(description="The tenant that owns the job.")
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    method: Method
    user_provided_suffix: str | None = None
    lora: LoraOptions = Field(description="swarmgate extension: the LoRA adapter the job trains.")


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
    type: Literal["message", "metrics"] = "message"


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: int
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool
