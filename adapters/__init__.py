"""Per-tenant LoRA adapters in PEFT's on-disk format: create, check, save, load, import, export (DESIGN.md §6).

adapter: the adapter (config + tensors), its content digest, checks against a base model ·
create: a fresh adapter initialised exactly as peft would · files: atomic save, load, archive
export and import · store: the per-tenant folder layout.
"""

from adapters.adapter import AdapterError, LoraAdapter
from adapters.create import create_adapter, lora_config
from adapters.files import export_archive, import_adapter, load_adapter, save_adapter
from adapters.store import AdapterStore

__all__ = [
    "AdapterError", "AdapterStore", "LoraAdapter", "create_adapter", "export_archive", "import_adapter",
    "load_adapter", "lora_config", "save_adapter",
]
