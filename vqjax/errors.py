"""Errors a user can fix: `vqjax.main` prints their message as one line and exits 2.

This module imports nothing from vqjax, so every layer may raise these.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input (config, data, weights, workdir, ...); the message says what to do."""


class ConfigError(UserError, ValueError):
  """A config value the code cannot run with; the message says what to change."""
