"""The one way vqjax talks to its user: `console` (stdout) and `warn` (stderr).

A leaf module (it imports nothing from vqjax), so every layer prints through it.
"""

from __future__ import annotations

import sys


def console(message: str) -> None:
  """One line of progress or results on stdout."""
  print(message, flush=True)


def warn(message: str) -> None:
  """One line about a problem the run survives, on stderr."""
  print(f"warning: {message}", file=sys.stderr, flush=True)
