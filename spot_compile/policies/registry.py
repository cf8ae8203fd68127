"""The policy registry: name -> `TokenPolicy` subclass. Config validation, the CLI's choices and `--help` read it."""

from __future__ import annotations

from spot_compile.policies.base import TokenPolicy

_POLICIES: dict[str, type[TokenPolicy]] = {}


def register(cls: type[TokenPolicy]) -> type[TokenPolicy]:
    """Class decorator: makes `cls` selectable as `SparsifyConfig(policy=cls.name)` and `--policy NAME`."""
    if not getattr(cls, "name", None) or not getattr(cls, "summary", None):
        raise TypeError(f"{cls.__name__} needs a `name` and a one-line `summary` to be registered")
    if cls.name in _POLICIES and _POLICIES[cls.name] is not cls:
        raise ValueError(f"a token policy named {cls.name!r} is registered already ({_POLICIES[cls.name].__name__})")
    _POLICIES[cls.name] = cls
    return cls


def policy_class(name: str) -> type[TokenPolicy]:
    return _POLICIES[name]


def policy_names() -> tuple[str, ...]:
    return tuple(_POLICIES)


def policy_help() -> str:
    """One line per policy, for `--help`."""
    return "; ".join(f"{name}: {cls.summary}" for name, cls in _POLICIES.items())


def stages_help() -> str:
    """Each policy's default stages, for `--stages`' help."""
    return "; ".join(f"{name}: {cls.stages_text}" for name, cls in _POLICIES.items())
