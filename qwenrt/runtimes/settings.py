"""The settings an engine runs with, and where each one came from.

Each engine declares its tunable settings (``Engine.knobs``): their candidate values on
a host, and qwenrt's rules for choosing one without measuring, each with the measured
reason behind it. Threads are one more setting, common to every engine. Every setting
an engine opens with is resolved to a value and an origin, first match wins:

1. ``command line``: given by the caller (``--threads``, ``EngineOptions.settings``);
2. ``profile``: chosen by ``qwenrt tune`` on this host, for this engine build and artifact;
3. ``rule``: qwenrt's built-in choice for hosts with this CPU's features;
4. ``engine default``: left to the engine (``None``: qwenrt does not set it).

``EngineOptions(engine_defaults=True)`` skips 1-3 for the knobs and threads alike: the
engine exactly as its library opens it, the baseline that shows what the rest is worth.

Some values load only beside some values of the knobs declared before them (``Knob.conflict``;
OpenVINO's f32 KV cache only with f32 arithmetic). A command line that asks for such a pair
is an error; a profile's or a rule's value that conflicts with what came before gives way to
the next rule that fits, so a changed setting never leaves the engine unable to load. So does any
value, the command line's too, beside a safe fallback that the probe had to take
(``ResolvedSettings.replaced``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pathlib import Path

    from qwenrt.host import Host

Origin = Literal["command line", "profile", "rule", "engine default"]
THREADS = "threads"


@dataclass(frozen=True)
class Rule:
    """qwenrt's choice of a value where ``applies(host)``, and the measured reason for it."""

    value: Any
    why: str
    applies: Callable[[Host], bool] = lambda host: True


@dataclass(frozen=True)
class Knob:
    """One setting of an engine that qwenrt may choose per host."""

    name: str
    description: str
    # The values worth trying on a host (``qwenrt tune``); None among them means "the engine's default".
    candidates: Callable[[Host], tuple[Any, ...]]
    # What the engine uses when qwenrt sets nothing, on this host (for reports).
    engine_default: Callable[[Host], Any]
    rules: tuple[Rule, ...] = ()
    # A crash on some host can come from this setting: the probe checks it before first use.
    affects_safety: bool = True
    # The tune objectives this setting can change (None: all of them).
    objectives: frozenset[str] | None = None
    # Why a value cannot load beside the values the earlier knobs run with (by name), or None.
    conflict: Callable[[Any, Mapping[str, Any]], str | None] = lambda value, earlier: None

    def rule_for(self, host: Host, earlier: Mapping[str, Any] | None = None) -> Rule | None:
        """The first rule for ``host`` whose value loads beside ``earlier``."""
        earlier = earlier or {}
        return next((rule for rule in self.rules if rule.applies(host) and not self.conflict(rule.value, earlier)),
                    None)  # fmt: skip


@dataclass(frozen=True)
class Combination:
    """Values of several knobs that pay only together, where each one alone is slower.

    ``qwenrt tune`` changes one knob at a time, which cannot find such a point by itself: it
    tries each combination that ``applies`` to the host and model folder as one more step,
    after the knobs.
    """

    name: str
    values: Mapping[str, Any]
    why: str
    applies: Callable[[Host, Path], bool]


@dataclass(frozen=True)
class Setting:
    value: Any  # what qwenrt sets; None: nothing, the engine decides
    origin: Origin
    why: str = ""
    effective: Any = None  # the value the engine runs with, where known

    def describe(self) -> dict[str, Any]:
        return {"value": self.value, "effective": self.value if self.value is not None else self.effective,
                "origin": self.origin, **({"why": self.why} if self.why else {})}  # fmt: skip


@dataclass(frozen=True)
class ResolvedSettings:
    """Every knob of one engine plus its threads, each with its value and origin."""

    values: Mapping[str, Setting] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name].value

    def get(self, name: str, default: Any = None) -> Any:
        setting = self.values.get(name)
        return default if setting is None or setting.value is None else setting.value

    def replaced(self, changes: Mapping[str, Any], origin: Origin, why: str, knobs: tuple[Knob, ...],
                 host: Host) -> ResolvedSettings:  # fmt: skip
        """These settings with ``changes``, and each other knob's value that cannot load beside
        them replaced by the first rule for ``host`` that fits, else the engine's default: a safe
        fallback overrides the command line too, and what depends on it follows."""
        values = {**self.values, **{name: Setting(value, origin, why) for name, value in changes.items()}}
        config = {name: setting.value for name, setting in values.items()}
        by_name = {knob.name: knob for knob in knobs}
        for name, (rule, given_way) in _give_way(knobs, host, config, keep=changes.keys()).items():
            values[name] = (
                Setting(rule.value, "rule", f"{rule.why} ({given_way})") if rule is not None
                else Setting(None, "engine default", given_way, effective=by_name[name].engine_default(host))
            )  # fmt: skip
        return ResolvedSettings(values)

    def effective(self, name: str) -> Any:
        """The value the engine runs with: the one qwenrt sets, else the engine's own where known."""
        setting = self.values[name]
        return setting.value if setting.value is not None else setting.effective

    def signature(self, knobs: tuple[Knob, ...]) -> str:
        """The values that decide whether the engine can crash, as one stable string."""
        return json.dumps({knob.name: self.get(knob.name) for knob in knobs if knob.affects_safety}, sort_keys=True)

    def plain(self) -> dict[str, Any]:
        return {name: setting.value for name, setting in self.values.items()}

    def describe(self) -> dict[str, dict[str, Any]]:
        return {name: setting.describe() for name, setting in self.values.items()}


def resolve(
    knobs: tuple[Knob, ...],
    host: Host,
    *,
    threads: int | None,
    given: Mapping[str, Any],
    profile: Mapping[str, Any] | None,
    engine_defaults: bool,
) -> ResolvedSettings:
    """Each knob's value and origin, and the thread count's (``None``: the engine's own choice)."""
    known = {knob.name for knob in knobs}
    unknown = sorted(set(given) - known)
    if unknown:
        from qwenrt.errors import QwenrtError

        choices = ", ".join(sorted(known))
        raise QwenrtError(f"unknown engine setting {', '.join(unknown)}; this engine has {choices}")
    values: dict[str, Setting] = {}
    if engine_defaults:
        values[THREADS] = Setting(None, "engine default")
        values.update({knob.name: Setting(None, "engine default", effective=knob.engine_default(host))
                       for knob in knobs})  # fmt: skip
        return ResolvedSettings(values)
    profile = profile or {}
    if threads is not None:
        values[THREADS] = Setting(threads, "command line")
    elif THREADS in profile:  # None: one per physical core
        values[THREADS] = Setting(profile[THREADS], "profile")
    else:
        values[THREADS] = Setting(host.physical_cores, "rule", "one thread per physical core")
    earlier: dict[str, Any] = {}  # what each knob resolved so far runs with
    for knob in knobs:
        if knob.name in given:
            setting = Setting(given[knob.name], "command line")
            if (why := knob.conflict(given[knob.name], earlier)) is not None:
                from qwenrt.errors import QwenrtError

                raise QwenrtError(f"{knob.name}={json.dumps(given[knob.name])} {why}")
        elif knob.name in profile and not knob.conflict(profile[knob.name], earlier):
            setting = Setting(profile[knob.name], "profile")
        elif (rule := knob.rule_for(host, earlier)) is not None:
            setting = Setting(rule.value, "rule", rule.why)
        else:
            setting = Setting(None, "engine default")
        if setting.value is None:
            setting = replace(setting, effective=knob.engine_default(host))
        values[knob.name] = setting
        earlier[knob.name] = setting.value if setting.value is not None else setting.effective
    return ResolvedSettings(values)


def fitted(knobs: tuple[Knob, ...], host: Host, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (every knob's value) with each value that cannot load beside the earlier
    ones replaced by the first rule that fits, else the engine's default: what ``qwenrt tune``
    measures when one of its steps changes a setting that a later one depends on."""
    fitted_config = dict(config)
    _give_way(knobs, host, fitted_config)
    return fitted_config


def _give_way(
    knobs: tuple[Knob, ...], host: Host, config: dict[str, Any], keep: Collection[str] = ()
) -> dict[str, tuple[Rule | None, str]]:
    """Replace, in ``config``, each value (but those named in ``keep``) that cannot load beside
    what the knobs before it run with by the first rule that fits (None: the engine's default);
    return, for each one replaced, that rule and why the value gave way."""
    gave_way: dict[str, tuple[Rule | None, str]] = {}
    earlier: dict[str, Any] = {}
    for knob in knobs:
        value = config.get(knob.name)
        runs_with = value if value is not None else knob.engine_default(host)
        conflict = knob.conflict(runs_with, earlier) if knob.name in config and knob.name not in keep else None
        if conflict is not None:
            rule = knob.rule_for(host, earlier)
            gave_way[knob.name] = (rule, f"{knob.name}={json.dumps(runs_with)} {conflict}")
            value = config[knob.name] = rule.value if rule is not None else None
            runs_with = value if value is not None else knob.engine_default(host)
        earlier[knob.name] = runs_with
    return gave_way
