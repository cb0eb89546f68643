"""Per-device memory of a train step from XLA's compiled memory analysis; one JSON line per case.

  python benchmarks/memory.py               # the ImageNet tokenizer, 8 fake CPU devices
  python benchmarks/memory.py --config=configs/seqgan_imagenet.py:nar_L --batch_per_device=64 \
      --param_sharding=fsdp --precision=bfloat16 --remat=block
  python benchmarks/memory.py --cases=issue  # the matrix of issue 18 (see ISSUE_CASES)
  python benchmarks/memory.py --cases=issue --select=tok256_b8_base,nar_L_b64_base
  python benchmarks/memory.py --config=configs/demo.py:smoke --devices=2 --batch_per_device=2 \
      --param_sharding=replicate --param_sharding=fsdp --grad_accum=1 --grad_accum=2

The option flags (--param_sharding, --precision, --remat, --grad_accum) repeat: one case,
and one line, per combination.

Nothing is allocated for the state: the trainer's own `setup` (vqjax/train/run.py for a
tokenizer recipe, vqjax/train/transformer.py for a transformer recipe) builds the mesh,
the models and the jitted train step exactly as training does, with its `sharded_init`
swapped for `abstract_sharded_init`, which runs the real `sharded_init` under
`jax.eval_shape` and keeps its shardings. The step is then lowered with
`jax.ShapeDtypeStruct`s of the state and of one global batch (`--batch_per_device` x the
mesh's data axis) and compiled, and `compiled.memory_analysis()` is read. The transformer's
`setup` reads its token store's token shape, codebook size, labels and condition maps; a
one-row store of the shape the recipe's tokenizer (`config.tokenizer.config`) produces is
written to a temporary folder for it (`--token_shape`/`--codebook_size` override them).

Default: `configs/vqgan_imagenet.py`, the VQGAN ImageNet tokenizer at 256px, f16 (16 x 16
tokens), K=1024, with the discriminator (the step from `loss.disc_start` on; --nogan for
the one before), batch 8 per device on 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count, set from --devices before JAX is
imported). The SeQ-GAN phase-1 tokenizer is the same f16 network, but its `logit` loss
layer needs a torchvision classifier file to build the step, so the plain VQGAN recipe
stands for the ImageNet tokenizer here.

The figures are per device: with fake devices XLA CPU compiles the SPMD-partitioned
program that each device runs, and its buffer assignment gives
  arguments    the state shard, the batch shard and the loss networks' weights (replicated)
  outputs      the new state shard and the metrics
  aliased      outputs written into donated arguments (the state: donate_argnums=0)
  temporaries  XLA's one temporary allocation: the peak of the heap simulation of every
               intermediate buffer (activations kept for the backward pass, gradients,
               optimiser intermediates, collectives' buffers) under the chosen schedule
  peak         arguments + outputs + temporaries - aliased: the distinct buffers that
               are allocated while the step runs (an aliased output is its argument's
               buffer, so it is counted once). Arguments and outputs are counted for the
               whole call, so this is an upper bound of what is live at once, by at most
               the non-aliased outputs (the metrics: bytes). Not counted: the generated
               code, the next batch prefetched to the device, the runtime's own reserves
               (GPU: cuDNN/cuBLAS workspaces, allocator fragmentation; see the caveats).
XLA CPU is not the GPU/TPU compiler: fusion, layouts, convolution algorithms (and their
workspaces) and the scheduler differ, so the temporaries are an estimate of an
accelerator's, and `fits_16gib` (peak <= 16 GiB) leaves no room for the runtime's reserve.
XLA CPU also drops the optimisation barriers that `jax.checkpoint` (`model.remat`) puts
around a recomputed block, and CSE then undoes the recomputation: by default the CPU
compile of a remat step has the temporaries of the step without it, to the byte. The
GPU compiler removes them only after scheduling (and TPU's honour them); this
benchmark's CPU compile keeps them (XLA_FLAGS --xla_disable_hlo_passes=cse_barrier_expander,
see BARRIER_PASS), and its lines say so (`remat_barriers_kept`).
Two effects go the other way and cannot be undone here:
  - `precision=bfloat16`: XLA CPU has no bf16 matmuls or convolutions; it runs them in
    float32 (bf16 operands converted, float32 results), so many activations stay float32
    and the CPU figures overstate a bf16 step's temporaries on GPU/TPU, where the
    results are bf16.
  - The GPU compiler rematerialises on its own (HloRematerialization) when a program
    exceeds a memory limit it derives from the device's memory, trading compute for
    memory; XLA CPU does not, so a CPU peak over the limit is what the program needs
    without that pass, not what a GPU would end up allocating.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import tempfile
import time


def _preparse(argv: list[str], name: str, default: str, boolean: bool = False) -> str:
  """The value of `--name=v` (or `--name v`; for a boolean `--name`/`--noname`) in argv,
  before absl parses it: JAX's device count is fixed when JAX is imported."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}":
      return "true" if boolean else (argv[i + 1] if i + 1 < len(argv) else default)
    if boolean and arg == f"--no{name}":
      return "false"
  return default


# XLA CPU's pass that removes optimisation barriers early in its pipeline, after which CSE
# merges a rematerialised block's recomputation with its forward pass: `model.remat` then
# changes nothing (same temporaries to the byte). The GPU and TPU compilers keep the
# barriers; disabling the pass makes the CPU compile honour them too (the program runs and
# computes the same values).
BARRIER_PASS = "cse_barrier_expander"


def _fake_devices(argv: list[str]) -> None:
  """JAX_PLATFORMS=cpu and XLA_FLAGS with --devices fake host devices and (unless
  --nokeep_remat_barriers) BARRIER_PASS disabled; nothing with --nocpu."""
  if _preparse(argv, "cpu", "true", boolean=True).lower() in ("false", "0"):
    return
  n = int(_preparse(argv, "devices", "8"))
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={n}")
  if _preparse(argv, "keep_remat_barriers", "true", boolean=True).lower() not in ("false", "0"):
    disabled = [f for f in flags if f.startswith("--xla_disable_hlo_passes=")]
    if disabled:
      flags.remove(disabled[-1])
      passes = disabled[-1].split("=", 1)[1]
      flags.append(f"--xla_disable_hlo_passes={passes},{BARRIER_PASS}")
    else:
      flags.append(f"--xla_disable_hlo_passes={BARRIER_PASS}")
  os.environ["XLA_FLAGS"] = " ".join(flags)


if __name__ == "__main__" and "jax" not in sys.modules:
  _fake_devices(sys.argv)

from absl import app, flags  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "configs/vqgan_imagenet.py", "recipe[:variant]")
_CASES = flags.DEFINE_enum(
    "cases", "", ["", "issue"],
    "'' (one case from the flags below) or 'issue': the matrix of issue 18 (ISSUE_CASES), "
    "on --devices devices (--config, --batch_per_device, --param_sharding, --precision, "
    "--remat and --grad_accum are then ignored)")
_SELECT = flags.DEFINE_list("select", [], "with --cases: only these case names")
_DEVICES = flags.DEFINE_integer("devices", 8, "devices of the mesh (fake CPU devices with --cpu)")
_CPU = flags.DEFINE_bool("cpu", True, "compile for --devices fake CPU devices (JAX_PLATFORMS=cpu); "
                         "--nocpu: the first --devices devices of the default backend")
_BARRIERS = flags.DEFINE_bool(
    "keep_remat_barriers", True, "with --cpu: keep the optimisation barriers of "
    "`model.remat` through XLA CPU's pipeline (BARRIER_PASS disabled), as GPU and TPU do; "
    "--nokeep_remat_barriers: XLA CPU's default, under which remat saves nothing")
_BATCH = flags.DEFINE_integer("batch_per_device", 8,
                              "examples per device; the global batch is this x the data axis")
_SHARDING = flags.DEFINE_multi_enum(
    "param_sharding", [""], ["", "replicate", "channels", "fsdp"],
    "config.mesh.param_sharding ('': the recipe's); repeat the flag for one case each")
_PRECISION = flags.DEFINE_multi_enum("precision", [""], ["", "float32", "bfloat16"],
                                     "config.precision ('': the recipe's); repeatable")
_REMAT = flags.DEFINE_multi_enum("remat", [""], ["", "none", "block"],
                                 "config.model.remat ('': the recipe's); repeatable")
_ACCUM = flags.DEFINE_multi_integer("grad_accum", [0], "config.train.grad_accum (0: the "
                                    "recipe's); repeatable")
_MODEL_AXIS = flags.DEFINE_integer("mesh_model", 0, "config.mesh.model (0: the recipe's)")
_GAN = flags.DEFINE_bool("gan", True, "tokenizer: the step with the discriminator (from "
                         "loss.disc_start on); --nogan: the step before it")
_TOKEN_SHAPE = flags.DEFINE_list("token_shape", [],
                                 "transformer: token map shape, e.g. 16,16 (default: what the "
                                 "recipe's tokenizer config produces)")
_CODEBOOK = flags.DEFINE_integer("codebook_size", 0, "transformer: codebook size (0: the "
                                 "recipe's tokenizer's)")
_BUDGET = flags.DEFINE_float("budget_gib", 16.0, "device memory the `fits_<budget>gib` field "
                             "compares the peak with")

GIB = 2**30
TOKENIZER_IMAGENET = "configs/vqgan_imagenet.py"
TRANSFORMER_L = "configs/seqgan_imagenet.py:nar_L"  # SeQ-GAN's MaskGIT, 24 x 1024, 16 heads


def _variants(name: str, config: str, batch: int, base: dict) -> list[dict]:
  """Baseline, each of remat/bf16/fsdp alone, and all three, as case dicts."""
  options = [("base", {}), ("remat", {"remat": "block"}), ("bf16", {"precision": "bfloat16"}),
             ("fsdp", {"param_sharding": "fsdp"}),
             ("all", {"remat": "block", "precision": "bfloat16", "param_sharding": "fsdp"})]
  return [{"name": f"{name}_b{batch}_{label}", "config": config, "batch_per_device": batch,
           **base, **opts} for label, opts in options]


# Issue 18's matrix, in the order it runs (the most wanted first, so a run cut short has them).
_TOK8 = _variants("tok256", TOKENIZER_IMAGENET, 8, {})
_NAR = _variants("nar_L", TRANSFORMER_L, 64, {})
_TOK32 = _variants("tok256", TOKENIZER_IMAGENET, 32, {})
ISSUE_CASES = _TOK8[:1] + _NAR[:1] + _TOK8[1:4] + _NAR[1:4] + _TOK8[4:] + _NAR[4:] + _TOK32


def flag_cases() -> list[dict]:
  """One case per combination of the (repeatable) option flags, in the flags' order."""
  return [{"name": "", "config": _CONFIG.value, "batch_per_device": _BATCH.value,
           "param_sharding": sharding, "precision": precision, "remat": remat,
           "grad_accum": accum}
          for sharding, precision, remat, accum in itertools.product(
              _SHARDING.value, _PRECISION.value, _REMAT.value, _ACCUM.value)]


def trainer_of(config) -> str:
  """'tokenizer' or 'transformer', from the config's fields."""
  if "objective" in config.model:
    return "transformer"
  if "encoder" in config.model and "quantizer" in config.model:
    return "tokenizer"
  raise app.UsageError("the config is neither a tokenizer's (model.encoder) nor a token "
                       "transformer's (model.objective)")


def configured(case: dict, devices: int):
  """The recipe's config with the case's options and a global batch of batch_per_device x
  the data axis; the eval/sample/tokenize batches, which the train step does not read, are
  raised to a multiple of the devices where the mesh could not split them."""
  from vqjax.core import partitioning
  from vqjax.core.config_files import load_config_file

  config = load_config_file(case["config"]).copy_and_resolve_references()
  with config.unlocked():
    if _MODEL_AXIS.value:
      config.mesh.model = _MODEL_AXIS.value
    if case.get("param_sharding"):
      config.mesh.param_sharding = case["param_sharding"]
    if case.get("precision"):
      config.precision = case["precision"]
    if case.get("remat"):
      config.model.remat = case["remat"]
    if case.get("grad_accum"):
      config.train.grad_accum = case["grad_accum"]
    data = partitioning.mesh_data_size(config, devices)
    config.train.batch_size = case["batch_per_device"] * data
    for section in ("eval", "sample", "tokenize"):
      if section in config and "batch_size" in config[section]:
        b = config[section].batch_size
        config[section].batch_size = math.ceil(b / devices) * devices
    if "fid" in config.eval and trainer_of(config) == "tokenizer":
      config.eval.fid = False  # the Inception network is not part of the train step
  return config


@contextlib.contextmanager
def abstract_sharded_init(module):
  """Within it, `module.sharded_init` returns (abstract state, shardings): the real
  `sharded_init` run under `jax.eval_shape`, its state's leaves as ShapeDtypeStructs
  carrying the shardings it placed them with. Nothing is allocated."""
  import jax

  real = module.sharded_init

  def abstract(*args):
    *leading, rng = args
    kept = {}

    def init(key):
      state, kept["shardings"] = real(*leading, key)
      return state

    shapes = jax.eval_shape(init, rng)
    shardings = kept["shardings"]
    # The shardings' tree is a prefix of the state's (boxed parameters under one sharding).
    state = jax.tree.map(
        lambda sh, sub: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), sub),
        shardings, shapes)
    return state, shardings

  module.sharded_init = abstract
  try:
    yield
  finally:
    module.sharded_init = real


def _abstract_batch(example: dict, global_batch: int, mesh) -> dict:
  """ShapeDtypeStructs of a global batch of `example`s (per-example shapes and dtypes),
  split over the data axis as the trainers' `shard_batch` splits it."""
  import jax
  import numpy as np

  from vqjax.core import partitioning

  sharding = partitioning.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((global_batch,) + np.shape(v), np.asarray(v).dtype,
                                  sharding=sharding) for k, v in example.items()}


def tokenizer_step(config, devices):
  """(jitted step, abstract args, facts) for a tokenizer recipe via vqjax.train.run.setup."""
  import jax
  import numpy as np

  from vqjax.train import run

  with abstract_sharded_init(run):
    s = run.setup(config, devices)
  size = config.data.image_size
  example = {"image": np.zeros((size, size, 3), np.float32), "label": np.int32(0)}
  if config.data.get("label_maps"):
    example["label_map"] = np.zeros((size, size), np.int32)
  batch = _abstract_batch(example, config.train.batch_size, s.mesh)
  step = s.train_step.gan if _GAN.value else s.train_step.plain
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  facts = {"image_size": size, "gan_step": _GAN.value, "params": count(s.state.params),
           "disc_params": count(s.state.disc_params),
           "loss_network_params": count(s.term_params)}
  return step, (s.state, batch, s.term_params), s.state, s.mesh, facts


def tokenizer_output_shape(tok_config) -> tuple[tuple[int, ...], int]:
  """(token map shape, codebook size) of a tokenizer config: its VQGAN's encode of one
  image, evaluated abstractly (what --mode=tokenize writes to its store)."""
  import jax
  import jax.numpy as jnp

  from vqjax.nn.vqgan import VQGAN
  from vqjax.train.tokenizer import build_models

  vqgan = build_models(tok_config).vqgan
  size = tok_config.data.image_size
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  indices = jax.eval_shape(
      lambda k: vqgan.init_with_output(k, x, method=VQGAN.encode)[0].indices,
      jax.random.PRNGKey(0))
  return tuple(indices.shape[1:]), int(tok_config.model.quantizer.codebook_size)


def write_token_store(folder: str, config, token_shape, codebook_size: int) -> None:
  """One token map of zeros (label 0; a condition map of zeros on the token grid with
  model.condition = 'semantic_map') in a finished store: what `setup` reads of a store is
  its token shape, codebook size, labels and condition maps."""
  import numpy as np

  from vqjax.data.tokens import TokenStoreWriter

  grid = tuple(token_shape[:2]) if config.model.condition == "semantic_map" else None
  writer = TokenStoreWriter(folder, token_shape, codebook_size, source={"memory_benchmark": 1},
                            condition_shape=grid)
  writer.add(np.zeros((1, *token_shape), np.int32), np.zeros((1,), np.int32),
             np.zeros((1, *grid), np.int32) if grid else None)
  writer.finish()


def transformer_step(config, devices):
  """(jitted step, abstract args, facts) for a transformer recipe via
  vqjax.train.transformer.setup over a one-row token store of the recipe's token shape."""
  import jax
  import numpy as np

  from vqjax.core.config_files import load_config_file
  from vqjax.train import transformer

  if _TOKEN_SHAPE.value:
    shape, k = tuple(int(v) for v in _TOKEN_SHAPE.value), _CODEBOOK.value
    if not k:
      raise app.UsageError("--token_shape needs --codebook_size")
  else:
    if not config.tokenizer.config:
      raise app.UsageError(f"{config.tokenizer} names no tokenizer config: give "
                           "--token_shape and --codebook_size")
    shape, k = tokenizer_output_shape(load_config_file(config.tokenizer.config))
    k = _CODEBOOK.value or k
  with tempfile.TemporaryDirectory(prefix="vqjax_memory_") as folder:
    write_token_store(folder, config, shape, k)
    with config.unlocked():
      config.tokens.dir = folder
      config.tokens.val_dir = ""
    with abstract_sharded_init(transformer):
      s = transformer.setup(config, devices)
    example = s.store[0]
  batch = _abstract_batch(example, config.train.batch_size, s.mesh)
  params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(s.state.params)))
  facts = {"token_shape": list(shape), "codebook_size": k,
           "objective": config.model.objective.name, "params": params}
  return s.train_step, (s.state, batch), s.state, s.mesh, facts


def state_bytes_per_device(state) -> int:
  """Bytes of one device's shards of the (abstract) state, from its shardings."""
  import jax
  import numpy as np

  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(state)))


def measure(case: dict) -> dict:
  import jax

  devices = jax.devices()[:_DEVICES.value]
  if len(devices) < _DEVICES.value:
    raise app.UsageError(f"--devices={_DEVICES.value}, but only {len(devices)} are visible")
  config = configured(case, len(devices))
  kind = trainer_of(config)
  start = time.perf_counter()
  build = tokenizer_step if kind == "tokenizer" else transformer_step
  step, args, state, mesh, facts = build(config, devices)
  setup_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered = step.lower(*args)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start  # lowering included: the step's time to compile
  m = compiled.memory_analysis()
  arguments, outputs = m.argument_size_in_bytes, m.output_size_in_bytes
  temporaries, aliased = m.temp_size_in_bytes, m.alias_size_in_bytes
  # Peak: the distinct buffers of the call (see the module docstring).
  peak = arguments + outputs + temporaries - aliased
  path, _, variant = case["config"].partition(":")
  gib = lambda b: round(b / GIB, 4)
  out = {
      "benchmark": "memory", **({"case": case["name"]} if case["name"] else {}),
      "config": path, "variant": variant, "trainer": kind,
      "platform": devices[0].platform, "devices": len(devices), "mesh": dict(mesh.shape),
      "param_sharding": config.mesh.param_sharding,
      "batch_per_device": case["batch_per_device"], "global_batch": config.train.batch_size,
      "precision": config.precision, "remat": config.model.remat,
      "grad_accum": config.train.get("grad_accum", 1), **facts,
      "state_gib": gib(state_bytes_per_device(state)),
      "arguments_gib": gib(arguments), "outputs_gib": gib(outputs),
      "temporaries_gib": gib(temporaries), "aliased_gib": gib(aliased),
      "generated_code_gib": gib(m.generated_code_size_in_bytes), "peak_gib": gib(peak),
      f"fits_{_BUDGET.value:g}gib": peak <= _BUDGET.value * GIB,
      "bytes": {"arguments": arguments, "outputs": outputs, "temporaries": temporaries,
                "aliased": aliased, "peak": peak, "state": state_bytes_per_device(state)},
      "remat_barriers_kept": (not _CPU.value) or _BARRIERS.value,
      "setup_s": round(setup_s, 1), "lower_s": round(lower_s, 1),
      "compile_s": round(compile_s, 1),
  }
  return out


def main(argv):
  del argv
  import gc

  import jax

  if _CPU.value and jax.devices()[0].platform != "cpu":
    raise app.UsageError("JAX was imported before the fake CPU devices were set up")
  # Every case compiles afresh (JAX_COMPILATION_CACHE_DIR, e.g. the tests', is not read):
  # compile_s is a compilation's time, and the analysis is the compiler's own.
  jax.config.update("jax_enable_compilation_cache", False)
  if _CASES.value == "issue":
    cases = ISSUE_CASES
    unknown = set(_SELECT.value) - {c["name"] for c in cases}
    if unknown:
      raise app.UsageError(f"unknown cases {sorted(unknown)}: use names from "
                           f"{[c['name'] for c in cases]}")
    if _SELECT.value:
      cases = [c for c in cases if c["name"] in _SELECT.value]
  else:
    cases = flag_cases()
  failed = 0
  for case in cases:
    try:
      line = measure(case)
    except app.UsageError:
      raise
    except Exception as e:  # noqa: BLE001  (report the case and go on with the others)
      if len(cases) == 1:
        raise
      failed += 1
      line = {"benchmark": "memory", **{k: v for k, v in case.items() if v},
              "error": f"{type(e).__name__}: {e}"[:2000]}
    print(json.dumps(line), flush=True)
    jax.clear_caches()
    gc.collect()
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
