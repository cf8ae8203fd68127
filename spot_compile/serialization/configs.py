"""Configs as they are stored in files: a plain dict with the config's name and version (torchao's
`config_to_dict` / `config_from_dict` are the model), read back through one function that knows every version a
release wrote. A stored config is inert data: reading it imports no pass and runs no code.

Versions: a config stored without a version (every file written before versions existed, the shipped predictors
among them) is version 1. `SparsifyConfig` 1 is today's fields; `PredictorConfig` 1 may lack `coverage` and
`anchor` (then 0 and off: what those files were calibrated with). A newer version than this release knows, or a
field it does not know, is refused naming the file's version: silently dropping a setting would rebuild another
model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spot_compile.errors import CheckpointError

# config class name -> the version this release writes
VERSIONS: dict[str, int] = {"SparsifyConfig": 1, "PredictorConfig": 1}


def config_to_dict(config: Any) -> dict:
    """`config` as {"_type", "_version", fields...}, JSON-ready."""
    name = type(config).__name__
    if name not in VERSIONS:
        raise TypeError(f"{name} is not a stored config type ({', '.join(VERSIONS)})")
    return {"_type": name, "_version": VERSIONS[name], **dataclasses.asdict(config)}


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
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"{where} stores {expected} settings this release does not know ({', '.join(unknown)}); "
                              "upgrade spot-compile, or write the file again with this release")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
