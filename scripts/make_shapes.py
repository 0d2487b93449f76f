#!/usr/bin/env python
r"""Write the synthetic shapes dataset (PNG images + COCO JSON with RLE masks), the project's built-in default set.

Usage:
  python scripts/make_shapes.py --out /tmp/shapes --num-train 1000 --num-val 200 --seed 0 [--size 128 | --size 96x160]
      [--force]

Writes DIR/train/*.png, DIR/val/*.png, DIR/annotations/instances_{train,val}.json and DIR/manifest.json (see
mrcnn_jax/data/shapes.py). A DIR that already holds a complete set with the same parameters is kept as is (--force
writes it again); one with other parameters is replaced; any other existing non-empty DIR is an error.
Exit status 0 on success, 1 on error, 2 on bad flags.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from mrcnn_jax.data import shapes


def _size(text: str) -> tuple[int, int]:
  """'128' -> (128, 128); '96x160' -> (96, 160) as (height, width)."""
  try:
    parts = [int(p) for p in text.lower().split("x")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--size takes S or HxW, got {text!r}") from None
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or min(parts) < shapes.MIN_SIDE:
    raise argparse.ArgumentTypeError(f"--size takes S or HxW with sides >= {shapes.MIN_SIDE}, got {text!r}")
  return parts[0], parts[1]


def parse_args(argv) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, type=pathlib.Path, help="the dataset directory")
  parser.add_argument("--num-train", required=True, type=int, help="number of train images")
  parser.add_argument("--num-val", required=True, type=int, help="number of val images")
  parser.add_argument("--seed", type=int, default=0, help="the set's seed (default 0)")
  parser.add_argument("--size", type=_size, default=(128, 128), help="image size, S or HxW (default 128)")
  parser.add_argument("--force", action="store_true", help="write the set even if an identical one is there")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  """The command line (argv without the program name; None: sys.argv) -> exit status, 0 on success."""
  args = parse_args(argv)
  params = dict(num_train=args.num_train, num_val=args.num_val, seed=args.seed, size_hw=args.size)
  start = time.perf_counter()
  try:
    if not args.force and shapes.has_dataset(args.out, **params):
      paths, action = shapes.dataset_paths(args.out.absolute()), "reused"
    else:
      paths, action = shapes.write_dataset(args.out, **params), "wrote"
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  seconds = time.perf_counter() - start
  print(f"{action} shapes dataset at {args.out} ({seconds:.1f} s): {args.num_train} train + {args.num_val} val "
        f"images of {args.size[0]}x{args.size[1]}, seed {args.seed}, classes {', '.join(shapes.CLASSES)}")
  for split in ("train", "val"):
    num_annotations = len(json.loads(paths[f"{split}_annotations"].read_text())["annotations"])
    print(f"  {split}: images {paths[f'{split}_images']}, annotations {paths[f'{split}_annotations']} "
          f"({num_annotations} instances)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
