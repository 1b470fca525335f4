"""Check a command line's overrides before Hydra runs, so a typo gets one short message that
names the valid choices instead of Hydra's traceback-shaped report."""

from __future__ import annotations

import difflib
from importlib import resources

from omegaconf import DictConfig, OmegaConf

CONF_PACKAGE = "llavanext.conf"
NOT_GROUPS = {"hydra"}
_MISSING = object()


def config_groups() -> dict[str, list[str]]:
    """Each config group under conf/ with its options (nested groups as `a/b`)."""
    groups: dict[str, list[str]] = {}

    def walk(folder, prefix):
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name not in NOT_GROUPS and not entry.name.startswith("__"):
                name = f"{prefix}{entry.name}"
                options = sorted(e.name[:-5] for e in entry.iterdir() if e.name.endswith(".yaml"))
                if options:
                    groups[name] = options
                walk(entry, name + "/")

    walk(resources.files(CONF_PACKAGE), "")
    return groups


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def keys_under(node) -> list[str]:
    return list(node.keys()) if isinstance(node, DictConfig) else []


def check_overrides(config_name: str, overrides: list[str]) -> str | None:
    """None when every override names a known group option or an existing key; else the message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        return f"cannot read the overrides: {str(e).splitlines()[0]}"

    groups = config_groups()
    choices, keys = [], []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            continue
        if key in groups:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for value in values:
                if value not in groups[key]:
                    return (f"{key}={value} is not an option of group '{key}'.{suggest(value, groups[key])} "
                            f"Options: {', '.join(groups[key])}")
            choices.append(f"{key}={values[0]}")
        elif not o.is_add() and not o.is_force_add():
            keys.append(key)
    if not keys:
        return None
    try:
        cfg = compose(config_name, choices)
    except HydraException as e:
        return str(e).splitlines()[0]
    for key in keys:
        if OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False) is not _MISSING:
            continue
        head, _, last = key.rpartition(".")
        node = OmegaConf.select(cfg, head, default=None) if head else cfg
        if isinstance(node, DictConfig) and last in node.keys():  # a mandatory key (???) is neither selected nor `in`
            continue
        parent, _, leaf = key.rpartition(".")
        while parent and not isinstance(OmegaConf.select(cfg, parent, default=None), DictConfig):
            parent, _, leaf = parent.rpartition(".")  # the deepest part of the key that exists
        siblings = keys_under(OmegaConf.select(cfg, parent) if parent else cfg)
        where = f"under '{parent}'" if parent else "at the top level"
        hint = suggest(leaf, siblings)
        return (f"unknown key '{key}' for `llavanext {config_name}`.{hint} Keys {where}: {', '.join(siblings)}"
                + (f". To add a new key, write +{key}=..." if not hint else ""))
    return None
