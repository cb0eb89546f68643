"""Summarise GAN runs as FQ-GAN's Tables 1-2 do: best and last-10 FID and IS.

  python -m vqjax.eval.gan_history RUN_DIR [RUN_DIR ...]

Reads every `eval_<step>.json` of each run directory (written by the GAN trainer's periodic
evaluation and --mode=eval). Per run: FID* (the best, lowest FID) and IS* (the best,
highest IS) over the evaluations, and the mean FID and IS of the last 10 evaluations. With
several runs (seeds) it adds the mean and std of each number across them. Prints one JSON
line per run and, with two or more, a summary line.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import numpy as np

from vqjax.errors import UserError

LAST = 10


def read_history(workdir: str) -> list[dict]:
  """The run's evaluations in step order ([] for none)."""
  found = []
  for path in glob.glob(os.path.join(workdir, "eval_*.json")):
    match = re.fullmatch(r"eval_(\d+)\.json", os.path.basename(path))
    if match:
      with open(path) as f:
        found.append((int(match.group(1)), json.load(f)))
  return [record for _, record in sorted(found, key=lambda item: item[0])]


def summarize_run(history: list[dict], last: int = LAST) -> dict:
  """{'fid_best', 'is_best' (None without IS), 'fid_last', 'is_last', 'evaluations'}."""
  fids = [h["fid"] for h in history if "fid" in h]
  scores = [h["inception_score"] for h in history if "inception_score" in h]
  if not fids:
    raise UserError("no evaluation with an FID in this run: train with eval.fid=True or run "
                    "--mode=eval first")
  return {"fid_best": float(min(fids)), "fid_last": float(np.mean(fids[-last:])),
          "is_best": float(max(scores)) if scores else None,
          "is_last": float(np.mean(scores[-last:])) if scores else None,
          "evaluations": len(fids)}


def summarize_runs(runs: list[dict]) -> dict:
  """Mean and std (population, ddof 0) of each number across runs (seeds)."""
  out = {"runs": len(runs)}
  for key in ("fid_best", "fid_last", "is_best", "is_last"):
    values = [r[key] for r in runs if r[key] is not None]
    if values:
      out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
  return out


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  runs = []
  try:
    for workdir in argv:
      run = {"workdir": workdir, **summarize_run(read_history(workdir))}
      runs.append(run)
      print(json.dumps(run))
  except UserError as e:
    print(f"error: {workdir}: {e}", file=sys.stderr)
    return 2
  if len(runs) > 1:
    print(json.dumps({"summary": summarize_runs(runs)}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
