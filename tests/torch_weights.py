"""Random torchvision detection weights that behave like trained ones, for the parity tests against torchvision and
against the Detectron2 conventions."""

import torch


def spread_weights(model, seed, pixels):
  """Random BatchNorm statistics and a classifier spread so that scores are neither tied nor saturated and the model
  returns many detections over several classes.

  Built without pretrained weights, torchvision's backbone uses nn.BatchNorm2d (in eval mode it computes what
  FrozenBatchNorm2d does). Its affine parameters are drawn at random, and its statistics are set to those of
  `pixels` (a preprocessed (1, 3, H, W) batch) layer by layer (one forward pass with momentum 1), so that activations
  keep a trained network's scale through the 50 layers rather than vanishing or exploding.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    norms = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for mod in norms:
      c = mod.weight.shape[0]
      mod.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
      mod.bias.copy_(torch.randn(c, generator=g) * 0.2)
      mod.momentum = 1.0
      mod.train()
    model.backbone.body(pixels)
    for mod in norms:
      mod.eval()
    model.rpn.head.bbox_pred.weight.mul_(0.1)
    predictor = model.roi_heads.box_predictor
    predictor.cls_score.weight.mul_(5.0)
    predictor.cls_score.bias.copy_(torch.randn(predictor.cls_score.bias.shape, generator=g))
