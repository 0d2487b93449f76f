"""The train step: optimizer (weight decay by kind, frozen stages, schedule) against hand-computed values, and one
jitted step of a tiny Mask R-CNN on a mesh of 8 CPU devices against the same step on 1 device.

The model tests share one tiny model (ResNet-18 at width 16 on 64x64 canvases, 32 FPN channels, few sampled
anchors and RoIs) and one batch of 8 synthetic images; initializing it and compiling its step for both meshes takes
about 40 s on 2 cores.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import load_config  # tests/conftest.py, on sys.path through pytest's rootdir conftest
from mrcnn_jax import train_state, train_step
from mrcnn_jax.mesh import make_mesh
from mrcnn_jax.data import pipeline
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

# --------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule.
# --------------------------------------------------------------------------------------------------------------------


def test_schedule_is_detectron2_warmup_multistep():
  config = load_config("mask_rcnn_R50_FPN_1x")  # base_lr 0.02, warmup 1000 from 0.001x, x0.1 at 60k and 80k
  schedule = train_state.learning_rate_schedule(config)
  expected = {
      0: 0.02 * 0.001,  # warmup start
      500: 0.02 * (0.001 * 0.5 + 0.5),  # halfway: 0.01001
      999: 0.02 * (0.001 * 0.001 + 0.999),
      1000: 0.02,
      59999: 0.02,
      60000: 0.002,  # Detectron2's bisect_right: the decay applies at the milestone itself
      79999: 0.002,
      80000: 0.0002,
      89999: 0.0002,
  }
  got = {step: float(schedule(step)) for step in expected}
  np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-6)


def test_schedule_without_warmup_starts_at_base_lr():
  config = load_config("mask_rcnn_R50_FPN_1x")
  config.train.warmup_iters = 0
  config.train.steps = (3,)
  schedule = train_state.learning_rate_schedule(config)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 3, 4)], [0.02, 0.02, 0.002, 0.002], rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Parameter kinds and the optimizer.
# --------------------------------------------------------------------------------------------------------------------


def _flat(tree):
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_param_labels_of_the_model_by_path():
  config = load_config("mask_rcnn_R50_FPN_1x")
  config.model.backbone.norm = "BN"  # norm scales and offsets in `params` (FrozenBN keeps them in batch_stats)
  shapes = jax.eval_shape(lambda k: mask_rcnn.init_variables(config, k, (64, 64)), jax.random.key(0))["params"]
  labels = _flat(train_state.param_labels(shapes, freeze_at=2))
  expected = {
      "backbone/stem_conv/kernel": train_state.FROZEN,
      "backbone/stem_norm/scale": train_state.FROZEN,
      "backbone/res2_0/conv1/kernel": train_state.FROZEN,
      "backbone/res2_2/norm3/bias": train_state.FROZEN,
      "backbone/res2_0/shortcut_norm/scale": train_state.FROZEN,
      "backbone/res3_0/conv1/kernel": train_state.KERNEL,
      "backbone/res3_0/norm1/scale": train_state.NORM,
      "backbone/res3_0/norm1/bias": train_state.NORM,
      "backbone/res3_0/shortcut_norm/bias": train_state.NORM,
      "backbone/res5_2/conv3/kernel": train_state.KERNEL,
      "fpn/lateral2/kernel": train_state.KERNEL,
      "fpn/lateral2/bias": train_state.BIAS,
      "rpn/conv/bias": train_state.BIAS,
      "rpn/objectness/kernel": train_state.KERNEL,
      "box_head/fc1/kernel": train_state.KERNEL,
      "box_head/cls_score/bias": train_state.BIAS,
      "mask_head/deconv/kernel": train_state.KERNEL,
      "mask_head/predictor/bias": train_state.BIAS,
  }
  assert {k: labels[k] for k in expected} == expected
  # Every frozen parameter sits in the stem or res2, and every parameter there is frozen.
  assert {k for k, v in labels.items() if v == train_state.FROZEN} == {
      k for k in labels if k.startswith(("backbone/stem_", "backbone/res2_"))}

  unfrozen = _flat(train_state.param_labels(shapes, freeze_at=0))
  assert unfrozen["backbone/stem_conv/kernel"] == train_state.KERNEL
  assert unfrozen["backbone/stem_norm/bias"] == train_state.NORM
  all_frozen = _flat(train_state.param_labels(shapes, freeze_at=5))
  assert all(v == train_state.FROZEN for k, v in all_frozen.items() if k.startswith("backbone/"))
  assert all_frozen["fpn/output5/kernel"] == train_state.KERNEL


def test_param_labels_refuse_an_unknown_kind():
  with pytest.raises(ValueError, match="box_head/fc1/embedding"):
    train_state.param_labels({"box_head": {"fc1": {"embedding": jnp.zeros(3)}}}, freeze_at=2)


def _toy_params():
  rng = np.random.default_rng(0)
  r = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  return {
      "backbone": {
          "stem_conv": {"kernel": r(2, 3)},
          "res2_0": {"conv1": {"kernel": r(3)}, "norm1": {"scale": r(3), "bias": r(3)}},
          "res3_0": {"conv1": {"kernel": r(2, 2)}, "norm1": {"scale": r(2), "bias": r(2)}},
      },
      "box_head": {"fc1": {"kernel": r(3, 2), "bias": r(2)}},
  }


def _toy_config(**train_fields):
  config = load_config("mask_rcnn_R50_FPN_1x")
  t = config.train
  # Distinct rates per kind, so that a parameter decayed at the wrong rate shows.
  t.weight_decay, t.weight_decay_bias, t.weight_decay_norm = 0.1, 0.01, 0.001
  t.base_lr, t.warmup_iters, t.steps, t.gamma, t.momentum = 0.5, 0, (1,), 0.1, 0.9
  for k, v in train_fields.items():
    t[k] = v
  return config


def test_sgd_momentum_with_weight_decay_by_kind_matches_hand_computation():
  config = _toy_config()
  params = _toy_params()
  rng = np.random.default_rng(1)
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(2)]
  tx = train_state.make_optimizer(config)
  state = tx.init(params)
  p = params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)

  # torch.optim.SGD by hand: d = g + wd * p; buf = 0.9 * buf + d; p -= lr * buf; lr 0.5 then 0.05 (decay at 1).
  def by_hand(p0, g1, g2, wd):
    buf = g1 + wd * p0
    p1 = p0 - 0.5 * buf
    buf = 0.9 * buf + (g2 + wd * p1)
    return p1 - 0.05 * buf

  flat_p, flat0, flat_g1, flat_g2 = _flat(p), _flat(params), _flat(grads[0]), _flat(grads[1])
  rates = {"backbone/res3_0/conv1/kernel": 0.1, "backbone/res3_0/norm1/scale": 0.001,
           "backbone/res3_0/norm1/bias": 0.001, "box_head/fc1/kernel": 0.1, "box_head/fc1/bias": 0.01}
  for name, wd in rates.items():
    np.testing.assert_allclose(flat_p[name], by_hand(flat0[name], flat_g1[name], flat_g2[name], wd), rtol=1e-6,
                               err_msg=name)
  # freeze_at 2: stem and res2 keep their values exactly, gradients and weight decay notwithstanding.
  for name in ("backbone/stem_conv/kernel", "backbone/res2_0/conv1/kernel", "backbone/res2_0/norm1/scale",
               "backbone/res2_0/norm1/bias"):
    np.testing.assert_array_equal(flat_p[name], flat0[name], err_msg=name)
  # ... and hold no momentum buffer.
  traces = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
            if any(getattr(k, "name", None) == "trace" for k in path)]
  assert sum(t.size for t in traces) == sum(v.size for k, v in flat0.items() if "res3_0" in k or "box_head" in k)


def test_gradient_clipping_by_global_norm():
  config = _toy_config(weight_decay=0.0, weight_decay_bias=0.0, weight_decay_norm=0.0,
                       clip_grad_norm=1.0)
  params = {"box_head": {"fc1": {"kernel": np.zeros((2,), np.float32), "bias": np.zeros((1,), np.float32)}}}
  grads = {"box_head": {"fc1": {"kernel": np.array([3.0, 0.0], np.float32), "bias": np.array([4.0], np.float32)}}}
  tx = train_state.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  # |g| = 5 -> g / 5, times -lr (0.5).
  np.testing.assert_allclose(updates["box_head"]["fc1"]["kernel"], [-0.3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates["box_head"]["fc1"]["bias"], [-0.4], rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# One step of a tiny model on 1 and 8 devices.
# --------------------------------------------------------------------------------------------------------------------

CANVAS, SLOTS, MASK = 64, 3, 16


def _tiny_config():
  config = load_config("mask_rcnn_R50_FPN_1x")
  m = config.model
  m.num_classes = 3
  m.backbone.depth, m.backbone.width = 18, 16  # basic blocks, a quarter of the channels
  m.fpn.channels = 32  # read by the FPN and the RPN head
  m.rpn.batch_size_per_image = 32
  m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train = 50, 20
  m.roi_heads.batch_size_per_image = 16
  m.roi_heads.foreground_buckets = (2,)  # 4 foreground slots per image: the heads' switch has a branch on 2
  m.roi_heads.fc_dim = 32
  m.mask_head.conv_dim = 16
  config.input.canvases = ((CANVAS, CANVAS),)
  t = config.train
  t.batch_size = 8
  t.warmup_iters = 0  # the full base_lr, so that the update is large enough to compare
  t.skip_nonfinite = True  # one compiled step serves the finite and the non-finite cases
  return config


def _tiny_batch(num_images=8):
  """The arrays of `examples.train_example` stacked to (B, ...): noise images with 1-2 elliptic instances each."""
  rng = np.random.default_rng(0)
  b = num_images
  batch = {
      "image": rng.normal(size=(b, CANVAS, CANVAS, 3)).astype(np.float32),
      "image_info": np.tile(np.array([CANVAS, CANVAS, 1, 1, CANVAS, CANVAS], np.float32), (b, 1)),
      "gt_boxes": np.zeros((b, SLOTS, 4), np.float32),
      "gt_classes": np.zeros((b, SLOTS), np.int32),
      "gt_valid": np.zeros((b, SLOTS), bool),
      "gt_is_crowd": np.zeros((b, SLOTS), bool),
      "gt_masks": np.zeros((b, SLOTS, MASK, MASK), np.uint8),
  }
  yy, xx = np.mgrid[:MASK, :MASK] + 0.5
  ellipse = (255 * (((yy - MASK / 2) / (MASK / 2)) ** 2 + ((xx - MASK / 2) / (MASK / 2)) ** 2 <= 1)).astype(np.uint8)
  for i in range(b):
    for g in range(1 + i % 2):
      x1, y1 = rng.uniform(2, 30, 2)
      w, h = rng.uniform(12, 30, 2)
      batch["gt_boxes"][i, g] = [x1, y1, x1 + w, y1 + h]
      batch["gt_classes"][i, g] = 1 + (i + g) % 3
      batch["gt_valid"][i, g] = True
      batch["gt_masks"][i, g] = ellipse
      # Something to see where the instance is.
      batch["image"][i, int(y1) : int(y1 + h), int(x1) : int(x1 + w), g] += 2.0
  return batch


class _Run:
  """One tiny model, its initial state on the host, and a jitted step per mesh size (compiled once each)."""

  def __init__(self, config):
    self.config = config
    self.model = MaskRCNN(config.model, train=True)
    # Host-drawn weights: no init program to compile.
    variables = mask_rcnn.random_variables(config, 0)
    self.initial = jax.device_get(train_state.state_from_variables(config, variables))
    self._steps = {}

  def step(self, num_devices, batch):
    """(new state, metrics) on the host after one step from the initial state on `num_devices` devices."""
    if num_devices not in self._steps:
      mesh = make_mesh(jax.devices()[:num_devices])
      self._steps[num_devices] = mesh, train_step.jit_train_step(self.config, self.model, mesh)
    mesh, step = self._steps[num_devices]
    # A fresh copy on the mesh each time: the step donates its input state.
    state = jax.device_put(self.initial, NamedSharding(mesh, P()))
    return jax.device_get(step(state, pipeline.to_global_batch(batch, mesh)))


@pytest.fixture(scope="module")
def run():
  return _Run(_tiny_config())


@pytest.fixture(scope="module")
def one_and_eight(run):
  batch = _tiny_batch()
  return run.step(1, batch), run.step(8, batch)


def test_eight_devices_give_the_losses_and_update_of_one(run, one_and_eight):
  (state1, metrics1), (state8, metrics8) = one_and_eight
  assert jax.device_count() == 8
  for name in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask", "total_loss", "grad_norm"):
    np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-5, err_msg=name)
  assert bool(metrics8["finite"]) and int(metrics8["nonfinite_skipped"]) == 0
  np.testing.assert_allclose(metrics8["lr"], run.config.train.base_lr, rtol=1e-6)
  assert int(state1.step) == int(state8.step) == 1
  for name, p8 in _flat(state8.params).items():
    p0, p1 = _flat(run.initial.params)[name], _flat(state1.params)[name]
    np.testing.assert_allclose(p8, p1, atol=1e-5, err_msg=name)
    # The updates themselves, which are much smaller than the params, agree too.
    np.testing.assert_allclose(p8 - p0, p1 - p0, atol=1e-6, rtol=1e-3, err_msg=name)


def test_frozen_stages_do_not_move_and_the_rest_does(run, one_and_eight):
  _, (state, _) = one_and_eight
  labels = _flat(train_state.param_labels(run.initial.params, run.config.model.backbone.freeze_at))
  before, after = _flat(run.initial.params), _flat(state.params)
  frozen = [k for k, v in labels.items() if v == train_state.FROZEN]
  assert "backbone/stem_conv/kernel" in frozen and "backbone/res2_1/conv2/kernel" in frozen
  for name in frozen:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  moved = {k for k in labels if labels[k] != train_state.FROZEN and not np.array_equal(after[k], before[k])}
  assert moved == {k for k in labels if labels[k] != train_state.FROZEN}
  # FrozenBN's constants are not the optimizer's.
  jax.tree.map(np.testing.assert_array_equal, state.batch_stats, run.initial.batch_stats)


def test_nonfinite_loss_skips_the_update_and_counts_it(run, one_and_eight):
  del one_and_eight  # compiled the 1-device step already
  batch = _tiny_batch()
  batch["image"][3, 10, 10, 0] = np.nan
  state, metrics = run.step(1, batch)
  assert not np.isfinite(metrics["total_loss"])
  assert not bool(metrics["finite"]) and int(metrics["nonfinite_skipped"]) == 1
  assert int(state.step) == 1  # the iteration moves on (new key, next batch) ...
  # ... with params, optimizer state (its count too) and batch_stats as they were.
  jax.tree.map(np.testing.assert_array_equal, state.params, run.initial.params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, run.initial.opt_state)
  jax.tree.map(np.testing.assert_array_equal, state.batch_stats, run.initial.batch_stats)


# --------------------------------------------------------------------------------------------------------------------
# Foreground buckets: the mask head runs on fewer RoI slots, with the same losses and gradients.
# --------------------------------------------------------------------------------------------------------------------


def test_foreground_caps_end_with_the_full_count():
  assert mask_rcnn.foreground_caps(128, (8, 16, 32, 64)) == (8, 16, 32, 64, 128)
  assert mask_rcnn.foreground_caps(4, (8, 16)) == (4,)  # buckets at or above the count are dropped
  assert mask_rcnn.foreground_caps(128, ()) == (128,)
  for bad in ((16, 8), (0, 8), (8, 8)):
    with pytest.raises(ValueError, match="foreground_buckets"):
      mask_rcnn.foreground_caps(128, bad)


def _losses_and_grads(config, initial, batch):
  model = MaskRCNN(config.model, train=True)

  @jax.jit
  def fn(params):
    def total(p):
      out, inter = model.apply({"params": p, "batch_stats": initial.batch_stats}, batch, jax.random.key(3),
                               method=MaskRCNN.losses, mutable=["intermediates"])
      return out["total_loss"], (out, inter["intermediates"]["max_foreground_rois"][0])

    return jax.grad(total, has_aux=True)(params)

  return jax.device_get(fn(initial.params))


def test_foreground_buckets_change_the_work_not_the_losses(run):
  batch = {k: v[:2] for k, v in _tiny_batch().items()}  # 1 and 2 instances
  configs = {}
  for name, buckets in (("full", ()), ("bucketed", (2, 3))):  # caps (4,) and (2, 3, 4): a switch of three branches
    configs[name] = run.config.copy_and_resolve_references()
    configs[name].model.roi_heads.foreground_buckets = buckets
  grads_full, (losses_full, num_fg) = _losses_and_grads(configs["full"], run.initial, batch)
  grads, (losses, num_fg_b) = _losses_and_grads(configs["bucketed"], run.initial, batch)
  # This batch has at most 3 foreground RoIs per image, so a smaller branch than the full 4 slots ran.
  assert int(num_fg) == int(num_fg_b) and 1 <= int(num_fg) <= 3
  assert losses["loss_mask"] > 0
  for name in losses_full:
    np.testing.assert_allclose(losses[name], losses_full[name], rtol=1e-6, err_msg=name)
  for name, g in _flat(grads).items():
    np.testing.assert_allclose(g, _flat(grads_full)[name], rtol=1e-5, atol=1e-7, err_msg=name)
  mask_grads = [g for name, g in _flat(grads).items() if name.startswith("mask_head/")]
  assert mask_grads and all(np.any(g != 0) for g in mask_grads)
