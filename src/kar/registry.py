"""Name -> implementation maps, and config schemas derived from constructor signatures.

Every pluggable part (backbone, adaptor, LLM provider, encoder, dataset) registers under the name
its YAML file uses. Hyperparameters are the constructor's keyword-only arguments with defaults;
framework-supplied sizes (numbers of fields, vector dims) are the other arguments. From that rule
`schema_for` builds a dataclass so that a config typo or a wrong type fails at start, with the
valid keys listed, instead of deep inside training.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kar.errors import ConfigError

T = TypeVar("T")

__all__ = ["ADAPTORS", "BACKBONES", "DATASETS", "ENCODERS", "LLMS", "ConfigError", "Registry"]


class Registry(Generic[T]):
    """A named collection of implementations of one kind (e.g. all backbones)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}. "
                f"Pick one of those or register a new {self.kind} under that name."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


BACKBONES: Registry[type] = Registry("backbone")
ADAPTORS: Registry[type] = Registry("adaptor")
LLMS: Registry[type] = Registry("llm provider")
ENCODERS: Registry[type] = Registry("encoder")
DATASETS: Registry[type] = Registry("dataset")


def hyperparameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword-only constructor arguments that carry defaults: what a YAML may set."""
    params = inspect.signature(cls.__init__).parameters
    return {
        n: p
        for n, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }


def schema_for(cls: type, extra: dict[str, tuple[Any, Any]] | None = None) -> type:
    """A dataclass mirroring `cls`'s hyperparameters (plus `extra` name -> (type, default))."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple[str, Any, Any]] = []
    for name, (tp, default) in (extra or {}).items():
        fields.append((name, tp, dataclasses.field(default=default)))
    for name, p in hyperparameters(cls).items():
        tp = hints.get(name, Any)
        default = p.default
        if isinstance(default, list | dict | tuple):
            value = list(default) if isinstance(default, tuple) else default
            fields.append((name, tp, dataclasses.field(default_factory=lambda v=value: v)))
        else:
            fields.append((name, tp, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def validate_group(group: str, node: DictConfig, cls: type, framework_keys: dict) -> DictConfig:
    """Check one config group node against `cls`'s schema; return the typed, merged node.

    `framework_keys` maps keys the framework reads itself (e.g. ``name``, ``embed_dim``) to
    ``(type, default)``.
    """
    schema = OmegaConf.structured(schema_for(cls, framework_keys))
    try:
        return OmegaConf.merge(schema, node)
    except OmegaConfBaseException as err:
        name = node.get("name")
        valid = ", ".join(k for k in schema if k != "name")
        raise ConfigError(
            f"bad {group} config for {name!r}: {getattr(err, 'msg', err)}"
            f"\n  valid keys of {group}={name}: {valid}"
            f"\n  fix the override, or the YAML under conf/{group}/ that sets name: {name}"
        ) from None


def init_kwargs(node: DictConfig, cls: type) -> dict[str, Any]:
    """The hyperparameters of `cls` read from a validated config node, as plain Python values."""
    data = OmegaConf.to_container(node, resolve=True)
    assert isinstance(data, dict)
    return {k: data[k] for k in hyperparameters(cls) if k in data}
