"""Inception Score with pytorch-fid's Inception file: its layout, its head, the score.

The file is built here in the exact layout of `pt_inception-2015-12-05-6726825d.pth`
(torchvision Inception3 names, no auxiliary classifier, 1008-way `fc`): the convolutions
and batch norms are `default_1.pt`'s mapped back to torch names (so the comparison with
the FID weights finds no difference), the head is random.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from tests.torch_files import write_torch_state_dict
from vqjax.errors import ConfigError, WeightsNotFoundError
from vqjax.eval import feature_stats as fs
from vqjax.eval import inception_features as incf
from vqjax.nn.inception import INPUT_SIZE, FIDInceptionV3, record_geometry
from vqjax.weights import inception_logits as il
from vqjax.weights.fid_inception import load_fid_inception_params
from vqjax.weights.torch_state_dict import TorchFileError

FIELD = "eval.inception_logits_path"


def file_tensors(num_batches_tracked: bool) -> dict[str, np.ndarray]:
  """The state dict pytorch-fid's file holds, in torchvision's order, from default_1.pt."""
  params = load_fid_inception_params()
  out = {}
  for prefix, path in il.TORCH_TO_FLAX.items():
    node = params
    for part in path.split("/"):
      node = node[part]
    out[f"{prefix}.conv.weight"] = np.transpose(node["kernel"], (3, 2, 0, 1))  # HWIO -> OIHW
    out[f"{prefix}.bn.weight"] = np.ones_like(node["beta"])
    out[f"{prefix}.bn.bias"] = node["beta"]
    out[f"{prefix}.bn.running_mean"] = node["mean"]
    out[f"{prefix}.bn.running_var"] = node["var"]
    if num_batches_tracked:
      out[f"{prefix}.bn.num_batches_tracked"] = np.array(0, np.int64)
  rng = np.random.default_rng(0)
  out["fc.weight"] = rng.normal(0.0, 0.2, (1008, 2048)).astype(np.float32)
  out["fc.bias"] = rng.normal(0.0, 1.0, (1008,)).astype(np.float32)
  return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """{'zip': path (with bn.num_batches_tracked, as torch >= 0.4.1 saves), 'legacy': path
  (without), 'tensors': the zip file's tensors}."""
  folder = tmp_path_factory.mktemp("pt_inception")
  out = {"tensors": file_tensors(num_batches_tracked=True)}
  for fmt, tracked in (("zip", True), ("legacy", False)):
    out[fmt] = str(folder / f"{fmt}_{il.FILE_NAME}")
    write_torch_state_dict(out[fmt], file_tensors(tracked), fmt)
  return out


def test_name_map_covers_every_convolution_with_torchvisions_geometry():
  layout = il.expected_layout()
  assert len(layout) == 94 * 5 + 2 and len(set(il.TORCH_TO_FLAX.values())) == 94
  assert layout["fc.weight"] == (1008, 2048) and layout["fc.bias"] == (1008,)
  # Kernels and strides as torchvision's Inception3 defines them, found at the mapped paths.
  with record_geometry() as geometry:
    jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32))
  kernels = {"Conv2d_1a_3x3": (3, 3), "Conv2d_3b_1x1": (1, 1), "Mixed_5b.branch5x5_2": (5, 5),
             "Mixed_6b.branch7x7_2": (1, 7), "Mixed_6b.branch7x7_3": (7, 1),
             "Mixed_6e.branch7x7dbl_2": (7, 1), "Mixed_6e.branch7x7dbl_5": (1, 7),
             "Mixed_7a.branch7x7x3_2": (1, 7), "Mixed_7b.branch3x3_2a": (1, 3),
             "Mixed_7c.branch3x3dbl_3b": (3, 1), "Mixed_7c.branch3x3dbl_2": (3, 3)}
  for name, kernel in kernels.items():
    assert tuple(geometry[il.TORCH_TO_FLAX[name]][0]) == kernel, name
  stride_2 = {name for name, path in il.TORCH_TO_FLAX.items() if geometry[path][1] == 2}
  assert stride_2 == {"Conv2d_1a_3x3", "Mixed_6a.branch3x3", "Mixed_6a.branch3x3dbl_3",
                      "Mixed_7a.branch3x3_2", "Mixed_7a.branch7x7x3_4"}
  widths = {"Mixed_5b.branch5x5_1": 48, "Mixed_5d.branch_pool": 64, "Mixed_6c.branch7x7_1": 160,
            "Mixed_7b.branch3x3dbl_1": 448, "Mixed_7c.branch1x1": 320}
  for name, width in widths.items():
    assert layout[f"{name}.conv.weight"][0] == width, name


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_layout_check_and_head_in_both_formats(files, fmt, capsys):
  il.check_inception_logits_file(files[fmt], FIELD)
  kernel, bias = il.load_inception_logits_head(files[fmt], FIELD)
  np.testing.assert_array_equal(kernel, files["tensors"]["fc.weight"].T)
  np.testing.assert_array_equal(bias, files["tensors"]["fc.bias"])
  assert kernel.dtype == np.float32 and kernel.shape == (2048, 1008)
  assert "warning" not in capsys.readouterr().err  # the same network as default_1.pt


def test_weights_that_differ_from_the_fid_file_are_warned_about(files, tmp_path, capsys):
  tensors = dict(files["tensors"])
  tensors["Mixed_6b.branch7x7_2.conv.weight"] = tensors["Mixed_6b.branch7x7_2.conv.weight"] + 1e-3
  tensors["Mixed_5c.branch_pool.bn.weight"] = np.full(64, 1.5, np.float32)  # a TF scale != 1
  params = load_fid_inception_params()
  assert il.weight_differences(files["tensors"], params) == []
  names = [name for name, _ in il.weight_differences(tensors, params)]
  assert names == ["Mixed_5c.branch_pool.bn.weight", "Mixed_6b.branch7x7_2.conv.weight"]
  path = str(tmp_path / "changed.pth")
  write_torch_state_dict(path, tensors, "zip")
  il.load_inception_logits_head(path, FIELD)
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "2 of 470 Inception tensors differ" in err
  assert "Mixed_5c.branch_pool.bn.weight" in err  # the largest difference (0.5)


def test_wrong_missing_or_unexpected_tensors_are_named(files, tmp_path):
  tensors = dict(files["tensors"])
  del tensors["Mixed_6c.branch7x7_2.conv.weight"]
  tensors["fc.bias"] = np.zeros(1000, np.float32)
  tensors["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  tensors["Conv2d_4a_3x3.bn.running_var"] = tensors["Conv2d_4a_3x3.bn.running_var"].astype(
      np.float64)
  path = str(tmp_path / "bad.pth")
  write_torch_state_dict(path, tensors, "legacy")
  for read in (il.check_inception_logits_file, il.load_inception_logits_head):
    with pytest.raises(TorchFileError) as e:
      read(path, FIELD)
    message = str(e.value)
    assert "\n" not in message and path in message and "4 problem(s)" in message
    for part in ("Conv2d_4a_3x3.bn.running_var is float64 [192] where float32 [192]",
                 "fc.bias is float32 [1000] where float32 [1008] is expected",
                 "unexpected tensor AuxLogits.fc.weight",
                 "missing Mixed_6c.branch7x7_2.conv.weight", il.FILE_NAME, il.URL, FIELD):
      assert part in message, part
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a torch file at all")
  with pytest.raises(TorchFileError, match=f"{FIELD} must be pytorch-fid's Inception file"):
    il.check_inception_logits_file(str(garbage), FIELD)


def test_empty_or_missing_path_is_one_line_naming_file_url_and_field(tmp_path, smoke_config):
  with pytest.raises(ConfigError) as e:
    il.check_inception_logits_file("", FIELD)
  missing = str(tmp_path / "nope.pth")
  with pytest.raises(WeightsNotFoundError) as e2:
    il.load_inception_logits_head(missing, FIELD)
  for error in (e, e2):
    message = str(error.value)
    assert "\n" not in message and il.FILE_NAME in message and il.URL in message
    assert FIELD in message
  # The config check runs before anything is built.
  from vqjax.train.run import setup

  with smoke_config.unlocked():
    smoke_config.eval.inception_logits_path = missing
  with pytest.raises(WeightsNotFoundError, match="nope.pth not found"):
    setup(smoke_config)


def numpy_inception_score(features, kernel, splits):
  """Salimans et al. 2016 by hand: softmax(f @ W), exp(mean KL(p(y|x) || p(y))) per split."""
  logits = np.asarray(features, np.float64) @ np.asarray(kernel, np.float64)
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):
    kl = np.sum(part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True))), axis=1)
    scores.append(np.exp(kl.mean()))
  return np.mean(scores), np.std(scores)


def test_splits_and_class_probabilities_by_hand():
  assert [fs.inception_score_splits(n) for n in (0, 1, 3, 7, 19, 20, 50_000)] == \
      [1, 1, 1, 3, 9, 10, 10]
  rng = np.random.default_rng(1)
  kernel = rng.normal(0, 0.05, (2048, 1008)).astype(np.float32)
  probs = incf.ClassProbabilities(kernel)
  assert probs.score() == {}
  features = np.abs(rng.normal(0, 1, (45, 2048))).astype(np.float32)
  probs.update(features[:30])
  probs.update(features[30:])
  out = probs.score()
  want = numpy_inception_score(features, kernel, 10)
  np.testing.assert_allclose([out["inception_score"], out["inception_score_std"]], want,
                             rtol=1e-5)
  assert out["inception_score"] > 1.0


def test_sample_metrics_report_the_inception_score_of_every_sample(files, smoke_config,
                                                                   monkeypatch):
  from vqjax.eval import evaluator

  # FID/KID at 2048 dims cost ~20 s of eigendecompositions on a busy CPU; they have their own
  # tests, so here they are stubbed and the IS is what is checked.
  def distribution_metrics(fake, ref, config, prefix=""):
    assert len(fake["features"]) == config.eval.max_features == 2
    return {f"{prefix}fid": 0.0}

  monkeypatch.setattr(evaluator, "distribution_metrics", distribution_metrics)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  extractor = incf.InceptionExtractor(mesh)
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)  # the Inception costs ~2 s each
  mask = (np.arange(4) < 3).astype(np.float32)  # the last row is padding
  with smoke_config.unlocked():
    smoke_config.eval.max_features = 2  # caps KID's raw features, not the IS's images
    smoke_config.eval.inception_logits_path = files["zip"]
  metrics = evaluator.sample_metrics([{"image": images, "mask": mask}], {}, smoke_config,
                                     extractor, total=3)
  assert metrics["num_samples"] == 3 and metrics["fid"] == 0.0
  features = extractor.gather(extractor(images), mask)
  kernel = files["tensors"]["fc.weight"].T
  want = numpy_inception_score(features, kernel, 1)  # 3 images: 1 split (2 splits from 4 on)
  np.testing.assert_allclose([metrics["inception_score"], metrics["inception_score_std"]], want,
                             rtol=1e-5)
  # The bias is left out on purpose (as the original IS code does); with it the score moves.
  logits = features.astype(np.float64) @ kernel + files["tensors"]["fc.bias"]
  assert not np.isclose(numpy_inception_score(logits, np.eye(1008), 1)[0], want[0], rtol=1e-3)


def test_tokenizer_eval_json_has_the_score_or_the_note(files, smoke_config, tmp_path,
                                                       monkeypatch):
  from vqjax.core.writers import make_writer
  from vqjax.eval.evaluator import IS_UNAVAILABLE, write_eval
  from vqjax.train.run import setup
  from vqjax.weights.fid_inception import fid_inception_path

  with smoke_config.unlocked():
    smoke_config.eval.fid = True
    smoke_config.eval.fid_method = "eigh"
    smoke_config.eval.kid_subsets = 2
    smoke_config.eval.batch_size = 4
    smoke_config.eval.max_examples = 4
    smoke_config.eval.stats_cache_dir = str(tmp_path / "cache")
    smoke_config.eval.inception_logits_path = files["legacy"]
  # Cached reference statistics (random), so that only the reconstructions go through the
  # Inception; rFID with a reference built in the pass is test_training.py's.
  reference = fs.RunningStats(2048)
  reference.update(np.abs(np.random.default_rng(3).normal(0, 1, (4, 2048))))
  description = incf.data_description(smoke_config, smoke_config.data.val_split)
  incf.save_stats(incf.reference_path(smoke_config.eval.stats_cache_dir, description,
                                      fid_inception_path()), reference)
  s = setup(smoke_config)
  metrics, grid = s.evaluate(s.state)
  path = write_eval(make_writer(str(tmp_path), True), str(tmp_path), 0, metrics, grid,
                    notes=s.notes)
  report = json.load(open(path))
  assert report["inception_score"] >= 1.0 and np.isfinite(report["inception_score_std"])
  assert np.isfinite(report["rfid"]) and "notes" not in report and report["num_examples"] == 4
  with smoke_config.unlocked():
    smoke_config.eval.inception_logits_path = ""
  monkeypatch.delenv("VQJAX_INCEPTION_LOGITS", raising=False)
  assert s.notes == [IS_UNAVAILABLE]
  assert all(part in IS_UNAVAILABLE for part in (il.FILE_NAME, il.URL, FIELD,
                                                 "VQJAX_INCEPTION_LOGITS"))
  monkeypatch.setenv("VQJAX_INCEPTION_LOGITS", files["zip"])  # the field's fallback
  assert s.notes == []
