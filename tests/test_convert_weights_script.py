"""scripts/convert_weights.py end to end: a torchvision state dict (.pth and .npz; needs torch) and an MSRA-named
ImageNet backbone .pkl (no torch) -> an orbax checkpoint, checked against the source arrays; bad inputs exit non-zero
with a message and write nothing."""

import importlib.util
import pathlib
import pickle

import numpy as np
import pytest

from mrcnn_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_script():
  spec = importlib.util.spec_from_file_location("_convert_weights_script", REPO / "scripts" / "convert_weights.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


script = _load_script()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """torchvision's maskrcnn_resnet50_fpn with random weights: its state dict as numpy, and as .pth and .npz files."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
  state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  folder = tmp_path_factory.mktemp("weights")
  torch.save(model.state_dict(), folder / "maskrcnn.pth")
  np.savez(folder / "maskrcnn.npz", **state_dict)
  return state_dict, folder / "maskrcnn.pth", folder / "maskrcnn.npz"


def _check_against_torchvision(variables, sd):
  params, stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(params["backbone"]["stem_conv"]["kernel"],
                                np.transpose(sd["backbone.body.conv1.weight"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(stats["backbone"]["stem_norm"]["var"], sd["backbone.body.bn1.running_var"])
  np.testing.assert_array_equal(params["backbone"]["res4_5"]["conv2"]["kernel"],
                                np.transpose(sd["backbone.body.layer3.5.conv2.weight"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(params["rpn"]["objectness"]["bias"], sd["rpn.head.cls_logits.bias"])
  np.testing.assert_array_equal(params["box_head"]["cls_score"]["kernel"],
                                sd["roi_heads.box_predictor.cls_score.weight"].T)
  np.testing.assert_array_equal(params["mask_head"]["predictor"]["kernel"],
                                np.transpose(sd["roi_heads.mask_predictor.mask_fcn_logits.weight"], (2, 3, 1, 0)))


@pytest.mark.parametrize("fmt", ["pth", "npz"])
def test_converts_torchvision(weights, fmt, tmp_path, capsys):
  sd, pth, npz = weights
  src = pth if fmt == "pth" else npz
  out = tmp_path / "ckpt"
  assert script.main(["--from", "torchvision", str(src), "--out", str(out)]) == 0
  summary = capsys.readouterr().out.strip()
  assert len(summary.splitlines()) == 1 and str(out) in summary
  variables = checkpoint.load_variables(out)
  _check_against_torchvision(variables, sd)
  # Every torchvision tensor except num_batches_tracked became one array (FrozenBN: 4 tensors -> 4 batch_stats).
  n_arrays = len(_leaves(variables))
  assert n_arrays == sum(not k.endswith("num_batches_tracked") for k in sd)
  assert f"{n_arrays} arrays" in summary
  config = checkpoint.load_config_json(out)
  assert config["model"]["num_classes"] == 90 and config["model"]["mask_head"]["enabled"]
  meta = checkpoint.load_metadata_json(out)
  assert meta["source"] == "torchvision" and meta["file"] == str(src.resolve())
  assert meta["config"].endswith("mask_rcnn_R50_FPN_torchvision.py")


def _leaves(tree):
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _leaves(v)]
  return [tree]


def test_overwrite_flag(weights, tmp_path, capsys):
  _, _, npz = weights
  out = tmp_path / "ckpt"
  out.mkdir()
  (out / "keep.txt").write_text("previous")
  assert script.main(["--from", "torchvision", str(npz), "--out", str(out)]) == 1
  assert "--overwrite" in capsys.readouterr().err
  assert (out / "keep.txt").read_text() == "previous"
  # Also the `path.py:arg` form of --config (runlocal changes the schedule and canvas, not the variables).
  assert script.main(["--from", "torchvision", str(npz), "--out", str(out), "--overwrite",
                      "--config", "configs/mask_rcnn_R50_FPN_torchvision.py:runlocal"]) == 0
  assert not (out / "keep.txt").exists()
  assert checkpoint.load_variables(out)["params"]["box_head"]["fc1"]["kernel"].shape == (256 * 7 * 7, 1024)


def test_missing_input(tmp_path, capsys):
  out = tmp_path / "ckpt"
  assert script.main(["--from", "torchvision", str(tmp_path / "nope.pth"), "--out", str(out)]) == 1
  assert "nope.pth" in capsys.readouterr().err
  assert not out.exists()


def test_incomplete_state_dict_names_file_and_key(tmp_path, capsys):
  np.savez(tmp_path / "partial.npz", **{"backbone.body.bn1.weight": np.ones(64, np.float32)})
  out = tmp_path / "ckpt"
  assert script.main(["--from", "torchvision", str(tmp_path / "partial.npz"), "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert "partial.npz" in err and "backbone.body.conv1.weight" in err
  assert not out.exists()


def test_unknown_source(tmp_path, capsys):
  assert script.main(["--from", "caffe", str(tmp_path / "w.pkl"), "--out", str(tmp_path / "ckpt")]) == 2
  assert "caffe" in capsys.readouterr().err
  assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("config, key", [
    # A keypoint model's heads: the mask head is unexpected, the keypoint head missing.
    ("configs/keypoint_rcnn_R50_FPN_torchvision.py", "keypoint_head"),
    # Detectron2's 80 classes against torchvision's 90: the first box-predictor array whose shape differs is named.
    ("configs/mask_rcnn_R50_FPN_1x.py", "['params']['box_head']"),
])
def test_mismatch_names_the_key_and_writes_nothing(weights, tmp_path, capsys, config, key):
  _, _, npz = weights
  out = tmp_path / "ckpt"
  assert script.main(["--from", "torchvision", str(npz), "--out", str(out), "--config", config]) == 1
  err = capsys.readouterr().err
  assert key in err and "maskrcnn.npz" in err
  assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_config(weights, tmp_path, capsys):
  _, _, npz = weights
  assert script.main(["--from", "torchvision", str(npz), "--out", str(tmp_path / "ckpt"),
                      "--config", "configs/no_such.py"]) == 1
  assert "no_such.py" in capsys.readouterr().err


def _msra_r50_blobs(rng):
  """The blobs of MSRA's R-50.pkl (Caffe2 names, AffineChannel norms), written out by hand from the ResNet-50
  architecture: stem 7x7/64, stages res2..res5 of (3, 4, 6, 3) bottlenecks of width 64..512 (output 4x), a branch1
  projection in each stage's first block, and the ImageNet classifier fc1000."""
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  blobs = {"conv1_w": f32(64, 3, 7, 7), "res_conv1_bn_s": f32(64), "res_conv1_bn_b": f32(64),
           "fc1000_w": f32(1000, 2048), "fc1000_b": f32(1000)}
  in_ch = 64
  for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    for i in range(blocks):
      name = f"res{stage + 2}_{i}"
      shapes = {"branch2a": (width, in_ch, 1, 1), "branch2b": (width, width, 3, 3), "branch2c": (4 * width, width, 1, 1)}
      if i == 0:
        shapes["branch1"] = (4 * width, in_ch, 1, 1)
      for branch, shape in shapes.items():
        blobs[f"{name}_{branch}_w"] = f32(*shape)
        blobs[f"{name}_{branch}_bn_s"] = f32(shape[0])
        blobs[f"{name}_{branch}_bn_b"] = f32(shape[0])
      in_ch = 4 * width
  return blobs


def test_converts_msra_backbone(tmp_path, capsys):
  blobs = _msra_r50_blobs(np.random.default_rng(0))
  with open(tmp_path / "R-50.pkl", "wb") as f:
    pickle.dump(blobs, f)
  out = tmp_path / "ckpt"
  assert script.main(["--from", "detectron2", str(tmp_path / "R-50.pkl"), "--out", str(out)]) == 0
  assert "backbone" in capsys.readouterr().out
  variables = checkpoint.load_variables(out)
  assert set(variables["params"]) == {"backbone"} and set(variables["batch_stats"]) == {"backbone"}
  bb, norms = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
  np.testing.assert_array_equal(bb["stem_conv"]["kernel"], np.transpose(blobs["conv1_w"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(norms["stem_norm"]["scale"], blobs["res_conv1_bn_s"])
  np.testing.assert_array_equal(bb["res5_0"]["shortcut_conv"]["kernel"],
                                np.transpose(blobs["res5_0_branch1_w"], (2, 3, 1, 0)))
  meta = checkpoint.load_metadata_json(out)
  assert meta["source"] == "detectron2" and meta["checked_against"] == "backbone"
  assert "fc1000_w" in meta["dropped"]


def test_msra_backbone_of_the_wrong_depth(tmp_path, capsys):
  blobs = _msra_r50_blobs(np.random.default_rng(0))
  with open(tmp_path / "R-50.pkl", "wb") as f:
    pickle.dump(blobs, f)
  out = tmp_path / "ckpt"
  assert script.main(["--from", "detectron2", str(tmp_path / "R-50.pkl"), "--out", str(out),
                      "--config", "configs/mask_rcnn_R101_FPN_3x.py"]) == 1
  err = capsys.readouterr().err
  assert "ResNet-101" in err and "res4_6" in err
  assert not out.exists()
