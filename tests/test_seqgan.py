"""SeQ-GAN end to end: configs/seqgan_imagenet.py:smoke runs every stage once (shared by the
tests of this module, which xdist keeps on one worker), and its bad inputs stop early."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, load_config, run_notebook
from tests.test_bad_inputs import run_table
from vqjax.core import checkpoint
from vqjax.data.tokens import TokenStore

pytestmark = pytest.mark.xdist_group("seqgan_smoke")
STAGES = ["phase1", "phase2", "tokens_train", "tokens_val", "nar", "nar_samples", "nar_eval",
          "ar", "ar_samples", "ar_eval", "visualize"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """DIR of a finished `configs/seqgan_imagenet.py:smoke` pipeline (run in this process).

  The directory is fixed per test session (and xdist worker): should pytest set this
  module fixture up again, the pipeline's markers make the rerun skip every stage.
  """
  from vqjax.train.pipeline import run_pipeline

  workdir = str(tmp_path_factory.getbasetemp() / "seqgan_smoke_run")
  cwd = os.getcwd()
  os.chdir(ROOT)  # the recipe names its stages' recipes by paths from the repository root
  try:
    run_pipeline(load_config("configs/seqgan_imagenet.py:smoke"), workdir)
  finally:
    os.chdir(cwd)
  return workdir


def test_smoke_pipeline_leaves_every_stages_output(smoke_run):
  for name in STAGES:
    assert os.path.exists(os.path.join(smoke_run, name, "stage_finished.json")), name
  for name in ("nar", "ar"):
    samples = glob.glob(os.path.join(smoke_run, name, "samples", "samples_*.npz"))
    assert len(samples) == 1 and np.load(samples[0])["images"].dtype == np.uint8
    (path,) = glob.glob(os.path.join(smoke_run, name, "eval_*.json"))
    with open(path) as f:
      metrics = json.load(f)
    assert np.isfinite(metrics["fid"]) and metrics["num_samples"] == 8, metrics
  (path,) = glob.glob(os.path.join(smoke_run, "ar", "visualize", "visualize_*.json"))
  with open(path) as f:
    payload = json.load(f)
  accuracies = payload["per_image_accuracy"]
  assert len(accuracies) == payload["num_images"] > 0
  assert payload["top1_accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-4)
  assert os.path.exists(path[:-len(".json")] + ".png")


def test_phase2_freezes_the_encoder_and_codebook_and_keeps_every_token(smoke_run, tmp_path):
  """Phase 2 starts from phase 1 (decoder paths copied, attention blocks new), trains only
  the decoder side, and tokenises every validation image exactly as phase 1 does."""
  from vqjax.train.modes import run_mode

  phase1, _ = checkpoint.restore_tree(os.path.join(smoke_run, "phase1"), -1)
  phase2, _ = checkpoint.restore_tree(os.path.join(smoke_run, "phase2"), -1)
  for part in ("encoder", "quant_conv", "quantizer"):
    for a, b in zip(jax.tree.leaves(phase1["params"][part]),
                    jax.tree.leaves(phase2["params"][part]), strict=True):
      np.testing.assert_array_equal(a, b)
  new = set(phase2["params"]["decoder"]) - set(phase1["params"]["decoder"])
  assert new and all(name.endswith(("_regional", "_dilated")) for name in new), new
  assert any(not np.array_equal(phase1["params"]["decoder"][k]["kernel"],
                                phase2["params"]["decoder"][k]["kernel"])
             for k in ("conv_in", "conv_out"))
  config = load_config("configs/seqgan_imagenet.py:phase1,smoke")
  with config.unlocked():
    config.tokenize.split = "validation"
    config.tokenize.output_dir = str(tmp_path / "phase1_tokens")
  run_mode(config, os.path.join(smoke_run, "phase1"), "tokenize")
  before = TokenStore(str(tmp_path / "phase1_tokens"))
  after = TokenStore(os.path.join(smoke_run, "phase2", "tokens_validation"))
  assert len(before) == len(after) > 0
  for i in range(len(before)):
    np.testing.assert_array_equal(before[i]["tokens"], after[i]["tokens"])


def test_visualization_colab_runs_on_the_smoke_run(smoke_run, tmp_path, monkeypatch):
  text = run_notebook("seqgan_visualization.ipynb", monkeypatch, smoke_run)
  assert "top-1 accuracy" in text and "pipeline directory " + smoke_run in text


def test_bad_seqgan_inputs_stop_before_compiling(tmp_path):
  """A phase 2 without its phase-1 checkpoint, a window that does not divide a decoder
  level, alpha outside [0, 1], `logit` without the VGG16 file or with a file of another
  layout: exit 2, one line."""
  from tests.torch_files import write_torch_state_dict

  phase1 = "configs/seqgan_imagenet.py:phase1,smoke"
  phase2 = "configs/seqgan_imagenet.py:phase2,smoke"
  other = str(tmp_path / "resnet50.pth")
  write_torch_state_dict(other, {"fc.weight": np.zeros((10, 8), np.float32)}, "legacy")
  run_table([
      ([f"--config={phase1}", "--config.loss.terms.perceptual.sem_layers=('logit',)",
        f"--config.loss.terms.perceptual.classifier_path={other}"],
       "is not torchvision's VGG16 (vgg16-397923af.pth)"),
      ([f"--config={phase2}", f"--config.init_from.workdir={tmp_path / 'phase1'}"],
       "has no checkpoint to start this run from"),
      ([f"--config={phase2}", "--config.model.decoder.window_size=5",
        f"--config.init_from.workdir={tmp_path}"], "window_size=5"),
      ([f"--config={phase1}", "--config.loss.terms.perceptual.alpha=1.5"], "alpha=1.5"),
      (["--config=configs/seqgan_imagenet.py:phase1"], "vgg16-397923af.pth"),
  ], tmp_path)


def test_transformer_epochs_count_the_token_store(smoke_run):
  from vqjax.train.modes import resolve_epochs

  config = load_config("configs/seqgan_imagenet.py:nar,smoke")
  config.tokens.dir = os.path.join(smoke_run, "phase2", "tokens_train")
  config.train.epochs = 3.0
  resolve_epochs(config)
  rows = len(TokenStore(config.tokens.dir))
  assert config.train.steps == -(-3 * rows // config.train.batch_size)
  assert load_config("configs/seqgan_imagenet.py:nar").train.epochs == 300.0


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
  """A file of torchvision's VGG16 layout (a small classifier) for the recipes' `logit`."""
  from tests.torch_files import torchvision_vgg16, write_torch_state_dict

  path = str(tmp_path_factory.mktemp("vgg16") / "vgg16-397923af.pth")
  write_torch_state_dict(path, torchvision_vgg16(8, 10), "legacy")
  return path


@pytest.mark.parametrize("spec", [
    "configs/seqgan_ffhq.py:smoke", "configs/seqgan_lsun.py:cat,smoke",
    "configs/seqgan_imagenet.py", "configs/seqgan_ffhq.py", "configs/seqgan_lsun.py:bedroom"])
def test_pipelines_plan(spec, tmp_path, vgg16_file, monkeypatch):
  """Every stage's recipe loads and validates; FFHQ's and LSUN's transformers are
  unconditional and LSUN's phase 1 starts from the ImageNet phase-1 run for one epoch (not
  in smoke: none exists). Without the VGG16 file, the full recipes stop at phase 1."""
  from vqjax.train.pipeline import PipelineError, plan

  if "smoke" not in spec:
    monkeypatch.delenv("VQJAX_VGG16_CLASSIFIER", raising=False)
    with pytest.raises(PipelineError, match=r"phase1.*classifier_path is empty.*"
                       r"VQJAX_VGG16_CLASSIFIER=/path/to/vgg16-397923af.pth"):
      plan(load_config(spec), str(tmp_path / "run"))
    monkeypatch.setenv("VQJAX_VGG16_CLASSIFIER", vgg16_file)
  stages = {s.name: s for s in plan(load_config(spec), str(tmp_path / "run"))}
  assert list(stages) == STAGES
  classes = 1000 if "imagenet" in spec else 0
  assert stages["nar"].config.model.num_classes == stages["ar"].config.model.num_classes == classes
  phase1 = stages["phase1"].config
  if "lsun" in spec and "smoke" not in spec:
    assert phase1.init_from.workdir.endswith("seqgan_imagenet/phase1")
    assert phase1.train.epochs == 1.0 and phase1.data.name == "lsun/bedroom"
  assert stages["phase2"].config.init_from.workdir == str(tmp_path / "run" / "phase1")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["configs/seqgan_ffhq.py:smoke",
                                  "configs/seqgan_lsun.py:cat,smoke"])
def test_ffhq_and_lsun_smoke_pipelines_run(spec, tmp_path):
  from vqjax.train.pipeline import run_pipeline

  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    stages = run_pipeline(load_config(spec), str(tmp_path / "run"))
  finally:
    os.chdir(cwd)
  assert [s.name for s in stages] == STAGES
  assert glob.glob(str(tmp_path / "run" / "ar" / "visualize" / "visualize_*.json"))
