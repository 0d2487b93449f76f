"""ResNet against torchvision's resnet18/resnet50 bodies (eval mode), with weights copied over by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling.resnet import ResNet

torch = pytest.importorskip("torch", reason="torchvision is the oracle; install the `parity` extra")
torchvision = pytest.importorskip("torchvision", reason="torchvision is the oracle")


def _torch_to_variables(net, bottleneck: bool):
  sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  params, stats = {}, {}

  def conv(key, name, tree):
    tree[name] = {"kernel": np.transpose(sd[f"{key}.weight"], (2, 3, 1, 0))}

  def bn(key, name, tree):
    tree[name] = {"scale": sd[f"{key}.weight"], "bias": sd[f"{key}.bias"], "mean": sd[f"{key}.running_mean"],
                  "var": sd[f"{key}.running_var"]}

  conv("conv1", "stem_conv", params)
  bn("bn1", "stem_norm", stats)
  convs = (1, 2, 3) if bottleneck else (1, 2)
  for stage, layer in enumerate([net.layer1, net.layer2, net.layer3, net.layer4]):
    for i in range(len(layer)):
      key, name = f"layer{stage + 1}.{i}", f"res{stage + 2}_{i}"
      params[name], stats[name] = {}, {}
      for j in convs:
        conv(f"{key}.conv{j}", f"conv{j}", params[name])
        bn(f"{key}.bn{j}", f"norm{j}", stats[name])
      if f"{key}.downsample.0.weight" in sd:
        conv(f"{key}.downsample.0", "shortcut_conv", params[name])
        bn(f"{key}.downsample.1", "shortcut_norm", stats[name])
  return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("depth", [18, 50])
def test_matches_torchvision(depth):
  torch.manual_seed(0)
  net = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # random statistics that keep activations at a sensible scale
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.weight.shape[0]
        m.weight.copy_(torch.rand(c, generator=g) * 0.3 + 0.3)
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
  x = np.random.default_rng(0).standard_normal((1, 3, 64, 96)).astype(np.float32)
  with torch.no_grad():
    t = torch.tensor(x)
    t = net.maxpool(net.relu(net.bn1(net.conv1(t))))
    want = []
    for layer in [net.layer1, net.layer2, net.layer3, net.layer4]:
      t = layer(t)
      want.append(t.permute(0, 2, 3, 1).numpy())
  model = ResNet(depth=depth, stride_in_1x1=False)
  got = jax.jit(model.apply)(_torch_to_variables(net, depth == 50), jnp.asarray(x.transpose(0, 2, 3, 1)))
  for level, w in zip(range(2, 6), want):
    g_ = np.asarray(got[level])
    assert g_.shape == w.shape
    assert np.abs(g_ - w).max() / np.abs(w).max() < 1e-4, level


def test_width_scales_channels():
  model = ResNet(depth=18, width=16)
  shapes = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((1, 64, 64, 3)))
  assert [shapes[l].shape[-1] for l in range(2, 6)] == [16, 32, 64, 128]
