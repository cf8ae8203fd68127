"""Token policies: one module per way of reducing tokens, each behind `TokenPolicy` and in the registry.

To add one: subclass `TokenPolicy` (or `DropPolicy` for a new scorer) in a module of its own and decorate it with
`@register`; settings of its own go in a frozen `policy_configs.PolicyConfig` subclass, named as its `config_type`.
Built-in policies are imported here; another package's are loaded from the entry-point group `spot_compile.policies`
(`[project.entry-points."spot_compile.policies"] name = "package.module"`), so they reach the CLI too. Nothing else
needs to change.
"""

import logging
from importlib.metadata import entry_points

from spot_compile.policies import class_attention, given_scorers, merge, random_tokens, spot  # noqa: F401 (each registers its policy)
from spot_compile.policies.base import DropPolicy, TokenPolicy, default_stages
from spot_compile.policies.given_scorers import GivenScorers
from spot_compile.policies.registry import policy_class, policy_help, policy_names, register, stages_help

__all__ = ["DropPolicy", "GivenScorers", "TokenPolicy", "default_stages", "policy_class", "policy_help", "policy_names", "register", "stages_help"]


def _load_plugins() -> None:
    for entry in entry_points(group="spot_compile.policies"):
        try:
            entry.load()
        except Exception as e:  # a broken plug-in must not take the built-in policies down with it
            logging.getLogger("spot_compile").warning("token policy plug-in %r failed to load: %s", entry.value, e)


_load_plugins()
