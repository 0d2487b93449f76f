"""The two programs compiled, lowered on abstract inputs: the train step (`lower_train_step`) and the inference
program (`lower_infer`), for each canvas of the config (`canvases`). Nothing here makes an array: the state is
`jax.eval_shape` of `train.create_train_state`, the batch `jax.ShapeDtypeStruct`s with their shardings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PROGRAMS = ("train", "infer")


def canvases(config) -> list[tuple[int, int]]:
  """The canvases (h, w) the config compiles one program for. The only place that reads the canvas field."""
  from mrcnn_jax.data import transforms

  return transforms.canvases(config.input)


def _abstract(tree, sharding):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


_STATE_SHAPES = {}  # config JSON -> the TrainState's shapes: a batch search traces the state once


def abstract_state(config, mesh):
  """The TrainState of `config` as ShapeDtypeStructs replicated over `mesh` (jax.eval_shape: no arrays, no init)."""
  from mrcnn_jax import train

  key = config.to_json_best_effort(sort_keys=True)
  if key not in _STATE_SHAPES:
    # Parameter shapes do not depend on the canvas; a small one keeps the trace short.
    _STATE_SHAPES[key] = jax.eval_shape(lambda k: train.create_train_state(config, k, (64, 64)), jax.random.key(0))
  return _abstract(_STATE_SHAPES[key], NamedSharding(mesh, P()))


def abstract_train_batch(config, mesh, canvas_hw, global_batch: int) -> dict:
  """The arrays `data.examples` gives, stacked to (global_batch, ...) and sharded over the mesh's first
  axis, as the trainer passes them (image_id is int32 without x64)."""
  from mrcnn_jax.data import examples

  inp = config.input
  b, (h, w), g, m = global_batch, canvas_hw, int(inp.max_instances), int(inp.gt_mask_size)
  k = examples.num_keypoints(inp)
  shapes = {
      "image": ((b, h, w, 3), jnp.float32),
      "image_info": ((b, 6), jnp.float32),
      "gt_boxes": ((b, g, 4), jnp.float32),
      "gt_classes": ((b, g), jnp.int32),
      "gt_valid": ((b, g), jnp.bool_),
      "gt_is_crowd": ((b, g), jnp.bool_),
      "gt_masks": ((b, g, m, m), jnp.uint8),
      "gt_keypoints": ((b, g, k, 3), jnp.float32),
      "image_id": ((b,), jnp.int32),
      "num_dropped": ((b,), jnp.int32),
      "num_skipped": ((b,), jnp.int32),
  }
  sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for key, (shape, dtype) in shapes.items()}


def lower_train_step(config, mesh, canvas_hw, global_batch: int):
  """`train.jit_train_step(config, ...)` lowered for `mesh` on abstract inputs: a jax.stages.Lowered."""
  from mrcnn_jax import train
  from mrcnn_jax.modeling import mask_rcnn

  step = train.jit_train_step(config, mask_rcnn.build_model(config, train=True), mesh)
  return step.lower(abstract_state(config, mesh), abstract_train_batch(config, mesh, canvas_hw, global_batch))


def lower_infer(config, mesh, canvas_hw, global_batch: int):
  """`mask_rcnn.build_infer(config)` lowered for `mesh`: variables replicated, images and image_info sharded."""
  from mrcnn_jax.modeling import mask_rcnn

  state = abstract_state(config, mesh)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  data = NamedSharding(mesh, P(mesh.axis_names[0]))
  h, w = canvas_hw
  images = jax.ShapeDtypeStruct((global_batch, h, w, 3), jnp.float32, sharding=data)
  info = jax.ShapeDtypeStruct((global_batch, 6), jnp.float32, sharding=data)
  return mask_rcnn.build_infer(config).lower(variables, images, info)
