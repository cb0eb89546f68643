"""Errors a user can fix: `vqjax.main` prints their message as one line and exits 2.

This module imports nothing from vqjax, so every layer may raise these.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input (config, data, weights, workdir, ...); the message says what to do."""


class ConfigError(UserError, ValueError):
  """A config value the code cannot run with; the message says what to change."""


class WeightsNotFoundError(UserError, FileNotFoundError):
  """A weight file (or the package that ships it) is missing; the message says what to install."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A run directory has no checkpoint (at the requested step); the message says what to do."""


class WorkdirError(UserError, OSError):
  """A run directory that cannot be used: not a directory, not writable, or not creatable."""
