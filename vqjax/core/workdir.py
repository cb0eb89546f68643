"""The check every writing mode runs on its run directory before anything is built."""

from __future__ import annotations

import os
import tempfile

from vqjax.errors import WorkdirError


def check_workdir(path: str, what: str = "--workdir") -> None:
  """WorkdirError unless `path` is, or can be created as, a directory this process can write.

  An existing `path` must be a directory in which a temporary file can be created and
  deleted. A missing one is not created here: its nearest existing ancestor must be a
  directory that passes the same test, so the run can create it later. `what` names the
  setting in the message (e.g. '--workdir', "stage 'tokenizer' workdir").
  """
  if not path:
    raise WorkdirError(f"{what} is empty: give a directory for checkpoints, logs and images.")
  target = os.path.abspath(path)
  probe = target
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    where = "is" if probe == target else f"would be inside {probe!r}, which is"
    raise WorkdirError(f"{what} {path!r} {where} a file, not a directory: choose another "
                       "directory, or move that file away.")
  try:
    fd, name = tempfile.mkstemp(prefix=".vqjax-write-test-", dir=probe)
    os.close(fd)
    os.remove(name)
  except OSError as e:
    reason = e.strerror or str(e)
    verb = "cannot write to it:" if probe == target else f"cannot create it inside {probe!r}:"
    raise WorkdirError(f"{what} {path!r}: {verb} {reason.lower()}; choose a directory this "
                       "user can write (a writable file system), or fix its permissions."
                       ) from None
