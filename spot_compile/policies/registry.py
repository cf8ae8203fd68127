"""The policy registry: name -> `TokenPolicy` subclass, beside the registry of their settings
(`policy_configs`). `sparsify`, the CLI's choices and `--help` read it; config validation reads only the settings'."""

from __future__ import annotations

from dataclasses import make_dataclass

from spot_compile.policies.base import TokenPolicy
from spot_compile.policy_configs import register_config

_POLICIES: dict[str, type[TokenPolicy]] = {}


def register(cls: type[TokenPolicy]) -> type[TokenPolicy]:
    """Class decorator: makes `cls` selectable as `SparsifyConfig(policy=cls.name)` and `--policy NAME`, with its
    settings `cls.config_type` (a policy that declares none gets its base's settings under its own name)."""
    if not getattr(cls, "name", None) or not getattr(cls, "summary", None):
        raise TypeError(f"{cls.__name__} needs a `name` and a one-line `summary` to be registered")
    if cls.name in _POLICIES and _POLICIES[cls.name] is not cls:
        raise ValueError(f"a token policy named {cls.name!r} is registered already ({_POLICIES[cls.name].__name__})")
    if "config_type" not in cls.__dict__:
        cls.config_type = make_dataclass(f"{cls.__name__}Config", [], bases=(cls.config_type,), frozen=True,
                                         namespace={"name": cls.name, "__module__": cls.__module__})
    if cls.config_type.name != cls.name:
        raise TypeError(f"{cls.__name__} is named {cls.name!r} but its config_type {cls.config_type.__name__} configures {cls.config_type.name!r}")
    register_config(cls.config_type)
    _POLICIES[cls.name] = cls
    return cls


def policy_class(name: str) -> type[TokenPolicy]:
    return _POLICIES[name]


def policy_names() -> tuple[str, ...]:
    """The policies that can be chosen by name (`--policy`)."""
    return tuple(n for n, cls in _POLICIES.items() if cls.config_type.by_name)


def policy_help() -> str:
    """One line per policy, for `--help`."""
    return "; ".join(f"{name}: {_POLICIES[name].summary}" for name in policy_names())


def stages_help() -> str:
    """Each policy's default stages, for `--stages`' help."""
    return "; ".join(f"{name}: {_POLICIES[name].stages_text}" for name in policy_names())
