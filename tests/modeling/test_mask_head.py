"""The mask head's class-selected form (inference) against its all-class logits (training, and the form converted
weights are checked with in the parity tests)."""

import jax
import numpy as np

from mrcnn_jax.modeling.mask_head import MaskHead


def _head_and_variables():
  head = MaskHead(num_classes=5, num_convs=2, conv_dim=16)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 14, 14, 8)).astype(np.float32)
  variables = head.init(jax.random.key(0), x)
  # A bias per class, so that picking the wrong class's bias would show.
  variables = jax.tree.map(np.asarray, variables)
  variables["params"]["predictor"]["bias"] = rng.normal(size=(6,)).astype(np.float32)
  return head, variables, x


def test_class_selected_logits_are_the_all_class_logits_picked():
  """Each RoI's own class channel (background 0 included, as padded detections carry) equals that channel of the
  all-class logits."""
  head, variables, x = _head_and_variables()
  classes = np.array([[0, 3, 5], [1, 1, 4]], np.int32)
  every = head.apply(variables, x)
  picked = head.apply(variables, x, classes)
  assert every.shape == (2, 3, 28, 28, 6) and picked.shape == (2, 3, 28, 28)
  expected = np.take_along_axis(np.asarray(every), classes[:, :, None, None, None], axis=-1)[..., 0]
  np.testing.assert_allclose(picked, expected, atol=1e-5, rtol=1e-5)


def test_predictor_parameters_keep_the_conv_layout():
  """Checkpoints and converters see the predictor as before: a 1x1 conv's kernel (1, 1, C, K+1) and bias (K+1,),
  whichever form initialized it."""
  head, variables, x = _head_and_variables()
  shapes = jax.tree.map(np.shape, variables["params"]["predictor"])
  assert shapes == {"kernel": (1, 1, 16, 6), "bias": (6,)}
  with_classes = head.init(jax.random.key(0), x, np.zeros((2, 3), np.int32))
  assert jax.tree.map(np.shape, with_classes) == jax.tree.map(np.shape, variables)
