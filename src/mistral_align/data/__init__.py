"""Data: reading sources, checking rows, encoding, mixing and packing figures.

The loaders are imported lazily: `mistral_align.data.config` is used by the Hydra configs and
should not pull in `datasets` just to build a dataclass.
"""

_LAZY = {
    "DataError": "mistral_align.data.load",
    "LoadedData": "mistral_align.data.load",
    "load_sft_dataset": "mistral_align.data.load",
    "load_dpo_dataset": "mistral_align.data.load",
    "packing_efficiency": "mistral_align.data.packing",
    "DataConfig": "mistral_align.data.config",
    "SourceConfig": "mistral_align.data.config",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
