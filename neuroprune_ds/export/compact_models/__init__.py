"""Compact model classes per family, and how an export plan becomes their config.

Each module here (``llama.py`` for LLaMA, Mistral and Qwen2, ``opt.py``, ``t5.py``, ``bart.py``,
``bert.py``) is self-contained: it imports only torch and transformers, so the converter copies it into the
export directory as ``modeling_neuroprune_<family>.py`` and points ``auto_map`` at it. That is why each file
repeats the small ``LayerConfig`` helper: remote code is one file. Each family's ``ArchSpec.compact``
(:class:`neuroprune_ds.arch.CompactFamily`) names its module and classes, which per-layer config fields hold
the kept sizes of which blocks and when a stock config can express them instead. Importing this package
registers the classes with the ``Auto*`` factories, so an export also loads without ``trust_remote_code``
wherever neuroprune_ds is installed.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from transformers import AutoConfig

from neuroprune_ds.arch import ARCHITECTURES, AUTO_MODEL_CLASSES, CompactFamily


def module_source(family: CompactFamily) -> str:
    """Path of the family's module in this package (what an export copies as ``family.file_name``)."""
    return os.path.join(os.path.dirname(__file__), f"{family.module}.py")


def load_module(family: CompactFamily) -> ModuleType:
    return importlib.import_module(f"{__name__}.{family.module}")


def register_auto_classes() -> None:
    """Register every compact config and model class with transformers' Auto factories."""
    families = {spec.compact.model_type: spec.compact for spec in ARCHITECTURES.values() if spec.compact}
    for family in families.values():
        module = load_module(family)
        config_class = getattr(module, family.config_class)
        AutoConfig.register(family.model_type, config_class, exist_ok=True)
        for task, class_name in family.model_classes.items():
            AUTO_MODEL_CLASSES[task].register(config_class, getattr(module, class_name), exist_ok=True)


register_auto_classes()
