"""One way for every config to check its fields: a rule per field, checked first thing in __post_init__.

    RULES = {"steps": whole(1), "lr": number(0, low_open=True), "decay": number(0, 1), "gate": choice("exp", "sigmoid")}
    def __post_init__(self):
        check_fields(self, self.RULES)

A value of the wrong type (a string, a float where an integer belongs, a bool where a number belongs) or out
of range is refused with a message naming the class, the field, what is allowed and what came:

    ValueError: TrainConfig.grad_clip must be a finite number > 0, got -1.0

Relations between fields (d_model divisible by n_heads, ...) stay in each __post_init__, after the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Rule:
    """What one field may hold. Build it with `whole`, `number`, `choice`, `flag` or `instance`."""
    kind: str                          # "whole", "number", "choice", "flag", "instance"
    low: float | None = None
    high: float | None = None
    low_open: bool = False             # low itself excluded
    high_open: bool = False            # high itself excluded
    values: tuple = ()                 # choice: the allowed values; instance: the allowed types
    optional: bool = False             # None allowed too

    def allows(self, value) -> bool:
        """Whether `value` satisfies the rule."""
        if value is None:
            return self.optional
        if self.kind == "flag":
            return isinstance(value, bool)
        if self.kind == "choice":
            return value in self.values
        if self.kind == "instance":
            return isinstance(value, self.values)
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "whole" else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def describe(self) -> str:
        """The rule in words, as the error message gives it."""
        if self.kind == "flag":
            text = "True or False"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(v) for v in self.values)
        elif self.kind == "instance":
            text = "a " + " or ".join(t.__name__ for t in self.values)
        else:
            text = "an integer" if self.kind == "whole" else "a finite number"
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {self.high:g}"
        return text + (", or None" if self.optional else "")


def whole(low: int | None = None, high: int | None = None, optional: bool = False) -> Rule:
    """An int (not a bool, not a float) in [low, high]."""
    return Rule("whole", low, high, optional=optional)


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           optional: bool = False) -> Rule:
    """A finite int or float (not a bool) between low and high, each end included unless said open."""
    return Rule("number", low, high, low_open, high_open, optional=optional)


def choice(*values) -> Rule:
    """One of `values`."""
    return Rule("choice", values=values)


def flag() -> Rule:
    """True or False (not 0 or 1)."""
    return Rule("flag")


def instance(*types: type) -> Rule:
    """An instance of one of `types` (its contents checked by the config itself)."""
    return Rule("instance", values=types)


def check_fields(config, rules: dict[str, Rule]) -> None:
    """Refuse the first field of `config` that breaks its rule, naming it. Every dataclass field must have
    a rule and every rule a field, so a field added later cannot go unchecked."""
    names = {f.name for f in fields(config)}
    cls = type(config).__name__
    if names != set(rules):
        raise TypeError(f"{cls}: rules and fields differ: no rule for {sorted(names - set(rules))}, "
                        f"no field for {sorted(set(rules) - names)}")
    for name, rule in rules.items():
        value = getattr(config, name)
        if not rule.allows(value):
            raise ValueError(f"{cls}.{name} must be {rule.describe()}, got {value!r}")
