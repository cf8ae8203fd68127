"""Configs as they are stored in files: a plain dict with the config's name and version (torchao's
`config_to_dict` / `config_from_dict` are the model), read back through one function that knows every version a
release wrote. A stored config is inert data: reading it imports no pass and runs no code.

Versions: a config stored without a version (every file written before versions existed, the shipped predictors
among them) is version 1. `SparsifyConfig` 1 holds the policy's name and the flat `fuse_pruned` / `predictors`;
2 adds `policy_config`, the policy's own settings (`policy_configs`) with their version. `PredictorConfig` 1 may
lack `coverage` (then 0: what those files were calibrated with) and may hold `anchor`, a predictor variant withdrawn
after it measured no gain (docs/research/why_not_beat_class_attention.md): off is read as the predictors they are,
on is refused. A newer version than this release knows, or a
field it does not know, is refused naming the file's version: silently dropping a setting would rebuild another
model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spot_compile.errors import CheckpointError
from spot_compile.policy_configs import PolicyConfig, config_type

# config class name -> the version this release writes
VERSIONS: dict[str, int] = {"SparsifyConfig": 2, "PredictorConfig": 2}


def config_to_dict(config: Any) -> dict:
    """`config` as {"_type", "_version", fields...}, JSON-ready."""
    name = type(config).__name__
    if name not in VERSIONS:
        raise TypeError(f"{name} is not a stored config type ({', '.join(VERSIONS)})")
    fields = dataclasses.asdict(config) if name != "SparsifyConfig" else config.to_dict()
    if name == "SparsifyConfig":
        settings = config.policy_config
        if not settings.storable:
            raise TypeError(f"{type(settings).__name__} holds objects and is not stored")
        fields["policy_config"] = {"_type": type(settings).__name__, "_version": settings.version, **dataclasses.asdict(settings)}
    return {"_type": name, "_version": VERSIONS[name], **fields}


def config_from_dict(data: dict, cls: type, where: str) -> Any:
    """The `cls` config stored as `data` (versioned, or an unversioned dict of fields: version 1); a CheckpointError
    naming `where` (the file) for a config this release cannot read. JSON's lists become the dataclass's tuples."""
    expected = cls.__name__
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} holds a damaged {expected} record (a {type(data).__name__}); write it again")
    data = dict(data)
    name, version = data.pop("_type", expected), data.pop("_version", 1)
    current = VERSIONS[expected]
    if name != expected:
        raise CheckpointError(f"{where} holds a {name} where a {expected} belongs; pass the file spot-compile wrote")
    if not isinstance(version, int) or not 1 <= version <= current:
        raise CheckpointError(f"{where} stores {expected} version {version!r}; this release reads versions 1 to {current}: "
                              "upgrade spot-compile, or write the file again with this release")
    if expected == "PredictorConfig" and version == 1 and "anchor" in data:
        if data.pop("anchor"):
            raise CheckpointError(f"{where} holds anchored predictors, a variant this release no longer builds; calibrate "
                                  "again (spot-compile calibrate)")
    if expected == "SparsifyConfig" and "policy_config" in data:
        data["policy"] = _policy_config_from_dict(data.pop("policy_config"), data.get("policy"), where)
    return cls(**_known_fields(data, cls, expected, where))


def _known_fields(data: dict, cls: type, expected: str, where: str) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"{where} stores {expected} settings this release does not know ({', '.join(unknown)}); "
                              "upgrade spot-compile, or write the file again with this release")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _policy_config_from_dict(data: Any, policy: Any, where: str) -> PolicyConfig:
    """The policy's settings stored beside its name; the name must be of an installed policy (checked by the
    caller, which can name a missing plug-in)."""
    if not isinstance(data, dict) or not isinstance(policy, str):
        raise CheckpointError(f"{where} holds a damaged policy record; write it again")
    data = dict(data)
    try:
        cls = config_type(policy)
    except KeyError:
        raise CheckpointError(f"{where} was made with token policy {policy!r}, which is not installed here; install the "
                              "package that provides it") from None
    data.pop("_type", None)
    version = data.pop("_version", 1)
    if not isinstance(version, int) or not 1 <= version <= cls.version:
        raise CheckpointError(f"{where} stores policy {policy!r}'s settings version {version!r}; this release reads versions "
                              f"1 to {cls.version}: upgrade spot-compile (or the plug-in), or write the file again")
    return cls(**_known_fields(data, cls, f"policy {policy!r}", where))
