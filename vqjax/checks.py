"""Declarative range and choice checks of config fields, one table per part of a config.

    check_fields(c.train, "train", {"steps": ">=1", "b1": "[0,1)", "name": ("adam", "adamw")})
    check_fields(c, "", {"precision": ("float32", "bfloat16")})  # top-level fields

A rule is a string, a bound (">=1", ">0", "<=10", ">=-1") or an interval
("[0,1)", "(0,1]", ...), or a tuple of the allowed values. A field the slice
does not have is skipped, so a table can list the fields of several
variants of a part. A value outside its rule is a ConfigError naming the
field, its value and the rule. Like `vqjax.errors`, this module imports
nothing above that leaf, so every layer (data sources included) can check
its own fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re

from vqjax.errors import ConfigError

_BOUND = re.compile(r"\s*(>=|>|<=|<)\s*(-?[0-9.eE+-]+)\s*")
_INTERVAL = re.compile(r"\s*([\[(])\s*(-?[0-9.eE+-]+)\s*,\s*(-?[0-9.eE+-]+)\s*([\])])\s*")


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a field admits: a numeric range (either end open, closed or absent) or choices."""
  low: float | None = None
  low_closed: bool = True
  high: float | None = None
  high_closed: bool = True
  choices: tuple | None = None

  def admits(self, value) -> bool:
    """Whether `value` satisfies the rule (numbers only for ranges; bools are not numbers)."""
    if self.choices is not None:
      return value in self.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
      return False
    if self.low is not None and (value < self.low or (value == self.low and not self.low_closed)):
      return False
    return self.high is None or value < self.high or (value == self.high and self.high_closed)

  def describe(self) -> str:
    """The rule in words, e.g. '>= 1', 'in [0, 1)', "one of ('adam', 'adamw')"."""
    if self.choices is not None:
      return f"one of {self.choices}"
    num = lambda x: f"{x:g}"
    if self.low is not None and self.high is not None:
      return (f"in {'[' if self.low_closed else '('}{num(self.low)}, {num(self.high)}"
              f"{']' if self.high_closed else ')'}")
    if self.low is not None:
      return f"{'>=' if self.low_closed else '>'} {num(self.low)}"
    return f"{'<=' if self.high_closed else '<'} {num(self.high)}"


def parse_rule(rule) -> Rule:
  """A rule as written in a table (see the module docstring) -> `Rule`."""
  if isinstance(rule, (tuple, list)):
    return Rule(choices=tuple(rule))
  match = _BOUND.fullmatch(rule)
  if match:
    op, value = match.group(1), float(match.group(2))
    if op.startswith(">"):
      return Rule(low=value, low_closed=op == ">=")
    return Rule(high=value, high_closed=op == "<=")
  match = _INTERVAL.fullmatch(rule)
  if match:
    return Rule(low=float(match.group(2)), low_closed=match.group(1) == "[",
                high=float(match.group(3)), high_closed=match.group(4) == "]")
  raise ValueError(f"not a config rule: {rule!r} (use '>=1', '[0,1)' or a tuple of choices)")


def check_fields(cfg, where: str, rules: dict) -> None:
  """ConfigError for the first field of `cfg` (config path `where`) that breaks its rule."""
  for name, rule in rules.items():
    if name not in cfg:
      continue
    value, parsed = cfg[name], parse_rule(rule)
    if parsed.admits(value):
      continue
    hint = ""
    if parsed.choices is not None and isinstance(value, str):
      near = difflib.get_close_matches(value, [str(c) for c in parsed.choices], n=1, cutoff=0.5)
      hint = f" Did you mean {near[0]!r}?" if near else ""
    path = f"{where}.{name}" if where else name
    raise ConfigError(f"{path}={value!r} must be {parsed.describe()}: set "
                      f"--config.{path} (or the recipe) to such a value.{hint}")


def check_table(config, table: dict) -> None:
  """`check_fields` for each section of `table` ({'train': rules, 'model.objective': rules};
  '' for the config's top-level fields)."""
  for where, rules in table.items():
    section = config
    for key in where.split(".") if where else ():
      section = section[key]
    check_fields(section, where, rules)
