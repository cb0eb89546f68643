"""Parts chosen by name from config: one `Registry` per kind of part.

A part is a Flax module (its dataclass fields are its config fields) or a
plain function (its keyword arguments with defaults are). It registers
itself where it is defined:

    @registry.DECODERS.register("vqgan")
    class Decoder(nn.Module): ...

and a recipe asks for it by name:

    c.model.decoder = registry.DECODERS.config("vqgan", ch=64)
    decoder = registry.DECODERS.build(c.model.decoder)

`config` and `check` reject an unknown name or field with the nearest valid
one, before anything is built. This module imports nothing from vqjax's
layers, so every layer can register its parts (see the README's layout).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import pkgutil
from typing import Any, Callable

import ml_collections

from vqjax.errors import ConfigError

_NOT_FIELDS = ("parent", "name")  # Flax's own dataclass fields


def _nearest(word: str, choices) -> str:
  near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
  return f" Did you mean {near[0]!r}?" if near else ""


class Registry:
  """Name -> part for one kind (`kind` is used in messages, e.g. 'decoder')."""

  def __init__(self, kind: str, where: str, packages: tuple[str, ...]):
    self.kind = kind
    self.where = where  # config path in messages, e.g. 'model.decoder'
    self.packages = packages  # every module in these is imported before a look-up
    self._parts: dict[str, Callable] = {}
    self._hidden: dict[str, tuple[str, ...]] = {}
    self._loaded = False

  def _load(self) -> None:
    """Import every module of `packages`, so a part in a new file registers itself.

    By module name (importlib), not an import statement: the registry stays a
    leaf that the layers below the trainers may import.
    """
    if self._loaded:
      return
    self._loaded = True
    for package_name in self.packages:
      package = importlib.import_module(package_name)
      for info in pkgutil.iter_modules(package.__path__, package_name + "."):
        importlib.import_module(info.name)

  def register(self, name: str, *, not_config: tuple[str, ...] = ()):
    """Decorator: register a module class or function under `name`.

    `not_config` names fields the trainer passes itself (e.g. a decoder's
    `out_channels`), which are therefore not part of the config.
    """
    def add(part):
      if name in self._parts and self._parts[name] is not part:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._parts[name] = part
      self._hidden[name] = tuple(not_config)
      return part
    return add

  def trainer_fields(self, name: str, **values) -> dict[str, Any]:
    """The entries of `values` that part `name` takes from the trainer (its `not_config`
    fields), e.g. `dtype` and `remat` for the parts that compute in a dtype or have
    blocks to rematerialise."""
    self.get(name)
    return {key: value for key, value in values.items() if key in self._hidden[name]}

  def names(self) -> list[str]:
    self._load()
    return sorted(self._parts)

  def __contains__(self, name: str) -> bool:
    self._load()
    return name in self._parts

  def get(self, name: str) -> Callable:
    self._load()
    if name not in self._parts:
      raise ConfigError(f"{self.where}.name={name!r} is not a registered {self.kind}; "
                        f"choose one of {self.names()}.{_nearest(name, self._parts)}")
    return self._parts[name]

  def fields(self, name: str) -> dict[str, Any]:
    """The part's config fields and their defaults."""
    part = self.get(name)
    hidden = set(_NOT_FIELDS) | set(self._hidden[name])
    if dataclasses.is_dataclass(part):
      out = {}
      for f in dataclasses.fields(part):
        if f.name in hidden or not f.init:
          continue
        if f.default is not dataclasses.MISSING:
          out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
          out[f.name] = f.default_factory()
        else:
          raise TypeError(f"{self.kind} {name!r}: field {f.name!r} needs a default to be "
                          "configurable (or list it in not_config)")
      return out
    params = inspect.signature(part).parameters.values()
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty and p.name not in hidden}

  def config(self, name: str, **overrides) -> ml_collections.ConfigDict:
    """`{'name': name, **defaults, **overrides}`; an unknown override is a ConfigError."""
    fields = self.fields(name)
    for key in overrides:
      if key not in fields:
        raise ConfigError(f"{self.where}.{key} is not a field of {self.kind} {name!r} "
                          f"(fields: {', '.join(sorted(fields))}).{_nearest(key, fields)}")
    return ml_collections.ConfigDict({"name": name, **fields, **overrides})

  def check(self, cfg, where: str | None = None) -> None:
    """A known name, only that part's fields (the message names the nearest), and the
    part's own `check_config(cfg)` where it has one (value ranges, divisibility).

    `where` is the config path of `cfg` in messages (default `self.where`; e.g.
    'loss.terms.<label>' for one of several terms); a `check_config` that takes a
    `where` argument gets it.
    """
    where = where or self.where
    values = dict(cfg)
    if "name" not in values:
      raise ConfigError(f"{where} has no 'name': choose one of {self.names()}.")
    name = values.pop("name")
    fields = self.fields(name)
    for key in values:
      if key not in fields:
        raise ConfigError(f"{where}.{key} is not a field of {self.kind} {name!r} "
                          f"(fields: {', '.join(sorted(fields))}).{_nearest(key, fields)}")
    own_check = getattr(self.get(name), "check_config", None)
    if own_check is None:
      return
    if "where" in inspect.signature(own_check).parameters:
      own_check(cfg, where=where)
    else:
      own_check(cfg)

  def kwargs(self, cfg) -> dict[str, Any]:
    """The fields of `cfg` as keyword arguments (sequences as tuples, for hashable modules)."""
    self.check(cfg)
    out = {}
    for key, value in dict(cfg).items():
      if key == "name":
        continue
      if isinstance(value, list):
        value = tuple(value)
      if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
      out[key] = value
    return out

  def build(self, cfg, **extra) -> Any:
    """The part named by `cfg.name`, constructed with `cfg`'s fields and `extra`.

    For a module this is an unbound instance; for a function, the function
    with its fields bound (`functools.partial`).
    """
    part = self.get(cfg["name"])
    kwargs = {**self.kwargs(cfg), **extra}
    if inspect.isclass(part):
      return part(**kwargs)
    return functools.partial(part, **kwargs)


# The registries. Parts register into them from their own files.
_NN = ("vqjax.nn",)
ENCODERS = Registry("encoder", "model.encoder", _NN)
QUANTIZERS = Registry("quantizer", "model.quantizer", _NN)
DECODERS = Registry("decoder", "model.decoder", _NN)
DISCRIMINATORS = Registry("discriminator", "disc", _NN)
GENERATORS = Registry("generator", "model.generator", _NN)  # GANs without an encoder
LOSS_TERMS = Registry("loss term", "loss.terms", ("vqjax.losses",))
GAN_LOSSES = Registry("GAN loss", "loss.gan", ("vqjax.losses",))
OBJECTIVES = Registry("transformer objective", "model.objective", ("vqjax.objectives",))

ALL = {r.kind: r for r in (ENCODERS, QUANTIZERS, DECODERS, DISCRIMINATORS, GENERATORS,
                          LOSS_TERMS, GAN_LOSSES, OBJECTIVES)}
