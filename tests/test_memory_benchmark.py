"""benchmarks/memory.py on tiny recipes: its JSON line's fields and figures that agree with
each other and with byte counts made here from the recipes' parameter counts."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT

FIELDS = ("config", "variant", "devices", "mesh", "param_sharding", "batch_per_device",
          "global_batch", "precision", "remat", "grad_accum", "params", "arguments_gib",
          "outputs_gib", "temporaries_gib", "aliased_gib", "peak_gib", "fits_16gib",
          "compile_s")


def start(*flags):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", "memory.py"),
                           "--devices=2", *flags], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def results(process) -> list[dict]:
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-3000:]
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def check_common(r: dict, devices: int, batch: int, remat: str = "none") -> dict:
  """Fields and the arithmetic between them; returns the raw byte counts."""
  for field in FIELDS:
    assert field in r, field
  assert r["devices"] == devices and r["mesh"] == {"data": devices, "model": 1}
  assert r["batch_per_device"] == batch and r["global_batch"] == batch * devices
  assert (r["precision"], r["remat"], r["grad_accum"]) == ("float32", remat, 1)
  assert r["remat_barriers_kept"] is True
  b = r["bytes"]
  assert b["peak"] == b["arguments"] + b["outputs"] + b["temporaries"] - b["aliased"]
  assert r["peak_gib"] == round(b["peak"] / 2**30, 4)
  assert r["fits_16gib"] is (b["peak"] <= 16 * 2**30)
  # The state is donated: every byte of it that goes out again is aliased to its input.
  assert b["aliased"] == b["state"] and b["outputs"] >= b["state"]
  assert b["temporaries"] > 0 and r["compile_s"] > 0
  return b


def test_memory_benchmark_tokenizer_and_transformer_sharding():
  """Tokenizer (demo smoke, GAN step) replicated; a tiny MaskGIT replicated, FSDP and
  replicated with remat."""
  running = {
      "tokenizer": start("--config=configs/demo.py:smoke", "--batch_per_device=1"),
      # One line per --param_sharding, in their order.
      "sharding": start("--config=configs/maskgit_imagenet.py:smoke", "--batch_per_device=2",
                        "--param_sharding=replicate", "--param_sharding=fsdp"),
      "remat": start("--config=configs/maskgit_imagenet.py:smoke", "--batch_per_device=2",
                     "--param_sharding=replicate", "--remat=block"),
  }
  (tok,), (rep, fsdp), (remat,) = (results(running[k])
                                   for k in ("tokenizer", "sharding", "remat"))

  # Tokenizer, replicated over 2 devices: every device holds the whole state (the VQGAN's and
  # the discriminator's parameters and two Adam moments each, float32), the loss network's
  # weights and its half of the batch; the arguments hold at least those.
  b = check_common(tok, 2, 1)
  assert (tok["config"], tok["variant"], tok["trainer"]) == ("configs/demo.py", "smoke",
                                                              "tokenizer")
  assert tok["param_sharding"] == "replicate" and tok["gan_step"] is True
  size = tok["image_size"]
  adam_state = 4 * 3 * (tok["params"] + tok["disc_params"])
  images = 1 * size * size * 3 * 4
  assert b["state"] >= adam_state
  assert b["arguments"] >= adam_state + 4 * tok["loss_network_params"] + images

  # MaskGIT: replicated, the state per device is the whole Adam state; FSDP splits the
  # parameters (and their moments) over the 2 devices, so each holds about half of it.
  for r in (rep, fsdp):
    check_common(r, 2, 2)
    assert r["trainer"] == "transformer" and r["params"] == rep["params"]
    assert r["token_shape"] == [16, 16]  # configs/demo.py's tokens: 64px, f4
  rb, fb = rep["bytes"], fsdp["bytes"]
  assert rep["param_sharding"] == "replicate" and fsdp["param_sharding"] == "fsdp"
  assert rb["state"] >= 4 * 3 * rep["params"]
  assert rb["arguments"] >= 4 * 3 * rep["params"]
  assert fb["arguments"] < rb["arguments"]
  assert fb["state"] < 0.75 * rb["state"]
  assert np.isclose(fb["state"], rb["state"] / 2, rtol=0.2)
  assert fb["arguments"] >= 4 * 3 * rep["params"] / 2

  # Remat: the same state and arguments, fewer temporaries (the blocks' activations are
  # recomputed in the backward pass: XLA CPU keeps the barriers that make it so).
  mb = check_common(remat, 2, 2, remat="block")
  assert mb["arguments"] == rb["arguments"] and mb["state"] == rb["state"]
  assert mb["temporaries"] < 0.8 * rb["temporaries"]
