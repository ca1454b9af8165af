"""The one config loader: YAML files in, validated values out, errors that say where.

Every config error names the file, the key path (`pools[2].gpu`) and what was expected,
and nothing is applied from a file that failed to validate. Section parsers for the
parts that several commands share (SLO classes, catalogs) live here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from scheduler.types import SloClass


class ConfigError(ValueError):
    """A config file or section is invalid: `where` is `file: key.path`."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def yaml_error(path: str | Path, exc: Exception) -> ConfigError:
    """A YAML syntax error as one line: `file:line:column: invalid YAML: problem`."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return ConfigError(where, f"invalid YAML: {problem}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping; a missing file, bad syntax or a non-mapping is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (byte {exc.start}: {exc.reason}); expected a YAML file") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(str(path), f"expected a mapping at the top level, got {type(doc).__name__}")
    return doc


T = TypeVar("T")

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a mapping"}


def get(
    section: Mapping[str, Any],
    key: str,
    kind: type[T],
    where: str,
    default: Any = ...,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
) -> T:
    """Typed lookup of `section[key]`, with `where` naming the section for errors."""
    path = f"{where}.{key}" if where else key
    if key not in section:
        if default is ...:
            raise ConfigError(path, f"required key is missing (expected {_TYPE_NAMES.get(kind, kind.__name__)})")
        return default  # type: ignore[no-any-return]
    value = section[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(path, f"expected {_TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(path, f"expected one of {', '.join(map(str, choices))}; got {value!r}")
    if minimum is not None and value < minimum:  # type: ignore[operator]
        raise ConfigError(path, f"expected a value >= {minimum}, got {value!r}")
    return value


def check_keys(section: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(where or "<top>", f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


DEFAULT_SLO_CLASSES = {
    "interactive": SloClass("interactive", ttft_slo_ms=1000.0, tpot_slo_ms=100.0, priority=0),
    "default": SloClass("default", ttft_slo_ms=3000.0, tpot_slo_ms=200.0, priority=1),
    "batch": SloClass("batch", ttft_slo_ms=60000.0, tpot_slo_ms=1000.0, priority=2),
}


def parse_slo_classes(raw: Any, where: str) -> dict[str, SloClass]:
    """`slo_classes: {name: {ttft_ms: 500, tpot_ms: 50, priority: 0}}`; defaults when absent."""
    if raw is None:
        return dict(DEFAULT_SLO_CLASSES)
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(where, "expected a non-empty mapping of SLO class name to {ttft_ms, tpot_ms}")
    classes: dict[str, SloClass] = {}
    for name, body in raw.items():
        path = f"{where}.{name}"
        if not isinstance(body, Mapping):
            raise ConfigError(path, "expected a mapping with ttft_ms and tpot_ms")
        check_keys(body, ("ttft_ms", "tpot_ms", "priority"), path)
        classes[str(name)] = SloClass(
            name=str(name),
            ttft_slo_ms=get(body, "ttft_ms", float, path, minimum=0.0),
            tpot_slo_ms=get(body, "tpot_ms", float, path, minimum=0.0),
            priority=get(body, "priority", int, path, default=0),
        )
    return classes


# --- the policy document and the two dialects it replaces ---------------------------------
#
# Router files used to say `policies:` + `dispatch: {default_policy, by_slo_class, ...}`,
# cluster files `dispatch: {..., per_slo_class}` + `queue: {policy}`. Both now carry one
# policy document (`policy:`, scheduler/policy_document.py), embedded or as a path; an old
# file still loads, converted here with the meaning it had (`tokenyard config migrate`
# prints the converted file).


def load_policy(raw: Any, source: str, base_dir: Path | None = None) -> Any:
    """The `policy:` value of a router or cluster file (`source`): an embedded mapping, or
    a path to a YAML file (relative to `base_dir`), validated into a `PolicyDocument`."""
    from scheduler.policy_document import PolicyDocumentError, load_policy_document

    where = "policy"
    if isinstance(raw, str):
        path = Path(raw)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        raw, source, where = load_yaml(path), str(path), ""
        if not raw:
            raise ConfigError(source, "the policy document is empty; expected a mapping (see docs/policy.md)")
    elif not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: policy", f"expected a policy document (a mapping) or a path to one, got {raw!r}")
    try:
        return load_policy_document(raw, where=where)
    except PolicyDocumentError as exc:
        raise ConfigError(source, str(exc)) from None


def slo_classes_to_document(classes: Mapping[str, SloClass]) -> dict[str, Any]:
    return {
        name: {"ttft_ms": c.ttft_slo_ms, "tpot_ms": c.tpot_slo_ms, "priority": c.priority}
        for name, c in classes.items()
    }


def router_dialect_to_policy(
    *, slo_classes: Mapping[str, SloClass], policies: Mapping[str, Any], default_policy: str,
    by_slo_class: Mapping[str, str], tenant_policies: Mapping[str, str], max_candidates: int,
    forward_priority: bool, affinity_ttl_s: float,
) -> dict[str, Any]:
    """The policy document that means what a router file's old keys meant."""
    return {
        "slo_classes": slo_classes_to_document(slo_classes),
        "profiles": {str(name): dict(body) for name, body in policies.items()},
        "selection": {"default": default_policy, "by_slo_class": dict(by_slo_class),
                      "by_tenant": dict(tenant_policies)},
        "window": {"max_candidates": max_candidates},
        "affinity": {"enabled": True, "ttl_s": affinity_ttl_s},
        "queue": {"sort": "fcfs", "engine_priority": "slo_priority" if forward_priority else "fcfs"},
    }


def sim_dialect_to_policy(
    *, slo_classes: Mapping[str, SloClass], dispatch: Mapping[str, Any],
    per_slo_class: Mapping[str, Mapping[str, Any]], queue_policy: Any,
) -> dict[str, Any]:
    """The policy document that means what a cluster file's old keys meant: every instance
    scored (no window), no session-affinity table, no admission queue."""
    profiles: dict[str, Any] = {"default": dict(dispatch)}
    by_class: dict[str, str] = {}
    for name, override in per_slo_class.items():
        profiles[f"slo_{name}"] = {**dispatch, **override}
        by_class[str(name)] = f"slo_{name}"
    return {
        "slo_classes": slo_classes_to_document(slo_classes),
        "profiles": profiles,
        "selection": {"default": "default", "by_slo_class": by_class},
        "window": {"max_candidates": 0},
        "affinity": {"enabled": False},
        "queue": {"sort": "fcfs", "engine_priority": queue_policy},
    }
