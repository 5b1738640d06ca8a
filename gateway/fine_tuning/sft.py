"""Supervised fine-tuning at the gateway: chat examples -> labelled tokens, and LoRA optimizer steps.

The gateway owns the trainable state (DESIGN.md §6): the LoRA tensors and AdamW's moments live
here; the blocks' forward and backward run behind a `BlocksFn` (the swarm, through the backend),
and the embeddings and LM head are the gateway's own, frozen. Everything here is blocking
torch code for a worker thread.

Choices, and why:
- The loss is on assistant tokens only (through each assistant turn's end-of-turn token, so the
  model learns to stop), found by rendering the chat template turn by turn: the tokens a turn adds
  after its generation prompt are exactly what the model must produce when served.
- One optimizer step per `batch_size` examples, whatever the micro-batching: the loss is the mean
  over every trained token of the batch, so gradients accumulated over micro-batches (right-padded,
  at most `max_tokens` rows x length each, under the servers' `--max-train-tokens`) equal one
  big batch's.
- AdamW without weight decay, linear decay of the learning rate to zero, gradient norm clipped to
  1: the usual LoRA recipe, and what keeps the high learning rates of small jobs stable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from adapters import LoraAdapter
from gateway.protocol.fine_tuning_schemas import Hyperparameters
from gateway.models import Head
from gateway.fine_tuning.training_data import ChatExample
from blocks.lora_weights import LoraWeights

IGNORE = -100  # label of tokens outside the loss
MAX_GRAD_NORM = 1.0
AUTO_EPOCHS = 3
AUTO_LEARNING_RATE_MULTIPLIER = 1.0

BlocksFn = Callable[[torch.Tensor, LoraWeights], torch.Tensor]
"""Every block of the base with the LoRA applied, differentiable in the hidden states and the LoRA tensors."""


def resolve_hyperparameters(requested: Hyperparameters, examples: int) -> Hyperparameters:
    """`auto` made concrete: 3 epochs, a batch of 1 per 16 examples (1 to 16), multiplier 1."""
    return Hyperparameters(
        n_epochs=AUTO_EPOCHS if requested.n_epochs == "auto" else requested.n_epochs,
        batch_size=min(16, max(1, examples // 16)) if requested.batch_size == "auto" else requested.batch_size,
        learning_rate_multiplier=(
            AUTO_LEARNING_RATE_MULTIPLIER
            if requested.learning_rate_multiplier == "auto"
            else requested.learning_rate_multiplier
        ),
    )


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # the token itself where it is trained, IGNORE elsewhere

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


def tokenize(tokenizer: PreTrainedTokenizerBase, example: ChatExample) -> TokenizedExample:
    """The conversation as the chat template renders it, labelled on its trained assistant turns.

    ValueError when the template refuses the conversation, or renders it in a way whose assistant
    turns cannot be told apart (its rendering of a prefix is not a prefix of the whole).
    """
    messages = example.chat()

    def render(count: int, generation_prompt: bool) -> list[int]:
        try:
            return list(tokenizer.apply_chat_template(
                messages[:count], add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
            ))
        except TemplateError as error:
            raise ValueError(f"the chat template rejected the messages: {error}") from None

    ids = render(len(messages), False)
    labels = [IGNORE] * len(ids)
    for index, message in enumerate(example.messages):
        if not message.trained:
            continue
        prompt, turn = render(index, True), render(index + 1, False)
        if turn[: len(prompt)] != prompt or ids[: len(turn)] != turn:
            raise ValueError(
                "the model's chat template does not render this conversation turn by turn, so its assistant "
                "tokens cannot be located"
            )
        labels[len(prompt) : len(turn)] = ids[len(prompt) : len(turn)]
    if not any(label != IGNORE for label in labels[1:]):
        raise ValueError("the chat template renders no assistant tokens to train on")
    return TokenizedExample(ids, labels)


def micro_batches(examples: Sequence[TokenizedExample], max_tokens: int) -> list[list[TokenizedExample]]:
    """Consecutive groups whose padded size (rows x longest row) stays within `max_tokens`."""
    groups: list[list[TokenizedExample]] = []
    for example in examples:
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * max(len(e.input_ids) for e in [*group, example]) <= max_tokens:
            group.append(example)
        else:
            groups.append([example])
    return groups


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels [rows, longest]; causal attention keeps padding out of real tokens."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return ids, labels


@dataclass(frozen=True)
class Metrics:
    loss: float  # mean next-token cross-entropy over trained tokens
    accuracy: float  # share of trained tokens the model predicts exactly (greedy)
    trained_tokens: int
    tokens: int  # every token of the examples, as OpenAI bills trained_tokens


class LoraOptimizer:
    """A job's trainable state: the LoRA tensors, AdamW over them, and the learning-rate schedule."""

    def __init__(
        self, adapter: LoraAdapter, head: Head, blocks: BlocksFn, *, learning_rate: float, total_steps: int,
        max_tokens: int, pad_id: int, device: torch.device | str = "cpu",
    ) -> None:
        self._adapter = adapter
        self._head = head
        self._blocks = blocks
        self._max_tokens = max_tokens
        self._pad_id = pad_id
        # On the head's device: AdamW and the clipping then run there (on a GPU, ~1 ms for an 8B
        # model's rank-16 attention LoRA instead of ~0.1 s of CPU), and gradients arrive there.
        self.params = {
            name: t.detach().to(device, torch.float32).clone().requires_grad_(True) for name, t in adapter.tensors.items()
        }
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=learning_rate, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: max(0.0, 1 - step / max(1, total_steps))
        )

    def step(self, batch: Sequence[TokenizedExample]) -> Metrics:
        """One optimizer step over `batch`; safe to call again with the same batch after a failure."""
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self._pass(batch, train=True)
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), MAX_GRAD_NORM)
        self.optimizer.step()
        self.schedule.step()
        return metrics

    def evaluate(self, examples: Sequence[TokenizedExample]) -> Metrics:
        with torch.no_grad():
            return self._pass(examples, train=False)

    def adapter(self) -> LoraAdapter:
        """The adapter with the current weights (a detached copy)."""
        return self._adapter.with_tensors(self.params)

    def _pass(self, examples: Sequence[TokenizedExample], *, train: bool) -> Metrics:
        trained = sum(example.trained_tokens for example in examples)
        loss_sum = correct = 0.0
        weights = LoraWeights(self.params, self._adapter.scaling)
        for group in micro_batches(examples, self._max_tokens):
            ids, labels = collate(group, self._pad_id)
            output = self._blocks(self._head.embed(ids), weights)
            logits = self._head.differentiable_logits(output)[:, :-1]
            targets = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                   reduction="sum")
            if train:
                (loss / trained).backward()
            loss_sum += loss.item()
            mask = targets != IGNORE
            correct += (logits.detach().argmax(-1) == targets)[mask].sum().item()
        return Metrics(
            loss=loss_sum / trained, accuracy=correct / trained, trained_tokens=trained,
            tokens=sum(len(example.input_ids) for example in examples),
        )


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return math.ceil(examples / batch_size)
