"""One training step: the losses, their gradients and the SGD update, jitted over a device mesh.

  state, batch --train_step--> (state + 1 update, metrics): `MaskRCNN.losses`, value_and_grad, `make_optimizer`
  config, model, mesh --jit_train_step--> step(state, global batch) -> (state, metrics), the state donated

Data parallel: the batch is sharded over the mesh's data axis (`data.pipeline.to_global_batch`), the state is
replicated, and XLA inserts the gradient all-reduce; no pmap, no hand-written collectives. Each step's sampling key
is folded from (train.seed, step), so a run is reproducible and a resumed run draws the same samples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.train_state import TrainState, learning_rate_schedule, make_optimizer


# --------------------------------------------------------------------------------------------------------------------
# One step.
# --------------------------------------------------------------------------------------------------------------------


def train_step(state: TrainState, batch: dict, *, config, model: MaskRCNN) -> tuple[TrainState, dict]:
  """One SGD step on a batch: losses, gradients, update.

  state: TrainState. batch: the dict of `data.examples.train_example` arrays stacked to (B, ...) (image
  (B, H, W, 3) float32, image_info (B, 6), gt_boxes (B, G, 4), gt_classes (B, G), gt_valid (B, G),
  gt_is_crowd (B, G), gt_masks (B, G, M, M) uint8; other keys are ignored). model: MaskRCNN(config.model,
  train=True); its compute dtype comes from config.model.compute_dtype, params and losses stay float32.

  Returns the new state (step + 1) and metrics, all () arrays: the model's losses (loss_rpn_cls, loss_rpn_loc,
  loss_cls, loss_box_reg, loss_mask, total_loss), lr (the rate of this update), grad_norm (global L2 norm of the
  gradients before clipping), finite (bool: total loss and gradient norm finite) and nonfinite_skipped (int32, 1
  when this step's update was skipped). With train.skip_nonfinite a non-finite step leaves params, batch_stats and
  optimizer state (hence the schedule's count) as they were; without it the update is applied and the caller is
  expected to stop on `finite` False.
  """
  # The same (seed, step) draws the same anchors and RoIs, whatever the device count or a restart.
  key = jax.random.fold_in(jax.random.key(config.train.seed), state.step)
  update_stats = config.model.backbone.norm == "BN"  # BatchNorm's running statistics; FrozenBN's are constants

  def loss_fn(params):
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    if update_stats:
      losses, new_vars = model.apply(variables, batch, key, method=MaskRCNN.losses, mutable=["batch_stats"])
      batch_stats = new_vars["batch_stats"]
    else:
      losses = model.apply(variables, batch, key, method=MaskRCNN.losses)
      batch_stats = state.batch_stats
    losses = {k: v.astype(jnp.float32) for k, v in losses.items()}
    return losses["total_loss"], (losses, batch_stats)

  (total, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)  # the L2 norm of all leaves together (float32: params are)
  tx = make_optimizer(config)
  lr = learning_rate_schedule(config)(optax.tree_utils.tree_get(state.opt_state, "count"))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  skipped = jnp.zeros((), jnp.int32)
  if config.train.skip_nonfinite:
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_if_bad(params, state.params)
    opt_state = keep_if_bad(opt_state, state.opt_state)
    batch_stats = keep_if_bad(batch_stats, state.batch_stats)
    skipped = (~finite).astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  metrics = dict(losses, lr=lr, grad_norm=grad_norm, finite=finite, nonfinite_skipped=skipped)
  return new_state, metrics


# --------------------------------------------------------------------------------------------------------------------
# The jitted step (over `mrcnn_jax.mesh.make_mesh`'s mesh).
# --------------------------------------------------------------------------------------------------------------------


def jit_train_step(config, model: MaskRCNN, mesh: Mesh, state_sharding=None, data_axis: str | None = None):
  """`train_step` jitted over `mesh`: step(state, batch) -> (state, metrics), the state's buffers donated.

  state_sharding: a sharding (or pytree of shardings) for the state; default replicated on every device.
  data_axis: the mesh axis the batch's leading dimension is sharded over; default the mesh's first axis.
  The batch must already be global arrays with that sharding (`data.pipeline.to_global_batch`), and the state on
  `state_sharding`; metrics come back replicated.
  """
  data_axis = mesh.axis_names[0] if data_axis is None else data_axis
  replicated = NamedSharding(mesh, P())
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(
      functools.partial(train_step, config=config, model=model),
      in_shardings=(state_sharding, NamedSharding(mesh, P(data_axis))),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,),
  )
