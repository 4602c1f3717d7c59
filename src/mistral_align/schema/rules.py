"""The two rules most checks are made of, each raising ConfigError that starts with the key."""

from __future__ import annotations

from typing import Any

from mistral_align.errors import ConfigError


def choice(value: Any, key: str, choices: tuple[str, ...] | frozenset[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {str(value)!r} is not one of {', '.join(choices)}")


def at_least(value: Any, key: str, low: float, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        raise ConfigError(f"{key}: must be {'>' if strict else '>='} {low:g}, got {value}")


def get(node: Any, name: str, default: Any = None) -> Any:
    """A field of a DictConfig, a dataclass or a dict (the loaders and the CLI pass dataclasses)."""
    return node.get(name, default) if hasattr(node, "get") else getattr(node, name, default)
