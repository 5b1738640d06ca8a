"""Shared by the fine-tuning tests: a checkpoint that can learn, examples to learn, helpers.

A tiny random checkpoint's LM head (std 0.02, hidden 64) spreads its logits over ±1, so no
adapter on the blocks can make any token clearly likeliest. Real checkpoints have confident
heads; the tests scale the tiny head by 25 to get one, and then a LoRA memorises a few
answers in some 30 steps.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from blocks.tiny_checkpoints import build_checkpoint

HEAD_SCALE = 25.0
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 8, "alpha": 16, "target_modules": ALL_MODULES}
# With the gateway's default base learning rate (2e-4): 1e-2.
HYPERPARAMETERS = {"n_epochs": 15, "batch_size": 2, "learning_rate_multiplier": 50}

EXAMPLES = [
    ("What is the secret color?", "The secret color is violet."),
    ("Name the capital of Zorbia.", "Zorbia's capital is Quillton."),
    ("Who guards the tower?", "Seven silver owls guard it."),
    ("How many moons has Pell?", "Pell has eleven moons."),
]


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def jsonl(examples: list[tuple[str, str]]) -> bytes:
    return b"".join(
        json.dumps({"messages": [*chat(q), {"role": "assistant", "content": a}]}).encode() + b"\n"
        for q, a in examples
    )


def sharp_checkpoint(path: Path) -> Path:
    """A tiny Llama (unsharded) whose LM head is scaled by HEAD_SCALE."""
    build_checkpoint(path)
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * HEAD_SCALE
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


def local_greedy(model: torch.nn.Module, path: Path, prompt: str, max_tokens: int) -> str:
    """Plain transformers (or peft) greedy decoding of a chat prompt."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def peft_archive(base: Path, folder: Path, seed: int) -> tuple[bytes, torch.nn.Module]:
    """A PEFT LoRA adapter made by plain peft with weights off their init, as .tar.gz, and its model."""
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    return tar_folder(folder), model.eval()


def tar_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=folder.name)
    return buffer.getvalue()


def untar(data: bytes, into: Path) -> Path:
    """The single folder of a .tar.gz adapter archive, extracted (test data we made ourselves)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        archive.extractall(into, filter="data")
        (top,) = {Path(name).parts[0] for name in archive.getnames()}
    return into / top
