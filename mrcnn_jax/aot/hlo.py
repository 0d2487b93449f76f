"""The ops slow on TPU in a compiled program, counted in its HLO text (`compiled.as_text()`): scatters, gathers (and
the large tables they read), while loops, conditionals, sorts, host transfers and f64 ops, each with the op_name of
the JAX code it comes from."""

from __future__ import annotations

import collections
import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HOST_OPS = ("infeed", "outfeed", "send", "recv", "send-done", "recv-done")
# A gather reading at least this much is "large": a table that is not a few indices or boxes.
LARGE_GATHER_BYTES = 1 << 20


def _array_bytes(shape_text: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape_text):
    n = math.prod(int(d) for d in dims.split(",")) if dims else 1
    total += n * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
  return total


def _split_instruction(line: str):
  """(name, result shape text, opcode, operand names, rest) of one HLO instruction line, or None."""
  m = re.match(r"\s*(?:ROOT\s+)?%?([^\s=%]+)\s*=\s*", line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):  # a tuple shape: up to its matching parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  body, depth = rest[op.end():], 1
  for i, ch in enumerate(body):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      break
  operands = re.findall(r"%([\w.\-]+)", body[:i])
  return m.group(1), shape, op.group(1), operands, body[i + 1:]


def _site(attrs: str) -> str:
  """Where an op comes from, from its metadata op_name, with the per-branch and per-unroll noise taken out."""
  m = re.search(r'op_name="([^"]*)"', attrs)
  if not m:
    return "?"
  name = re.sub(r"^jit\([^)]*\)/", "", m.group(1))
  name = re.sub(r"branch_\d+_fun", "branch_*", name)
  name = re.sub(r"/(?:closed_call|pjit|remat)(?=/|$)", "", name)
  return name


def slow_ops(hlo_text: str) -> dict:
  """Counts of the ops that are slow on TPU in a compiled module's text (`compiled.as_text()`), each instruction
  once (inside fusions and loop bodies too; a while body's ops run once per iteration, which the counts do not
  multiply).

  Returns {"scatter": n, "gather": n, "gather_large": n, "while": n, "conditional": n, "sort": n,
  "host_transfer": n, "f64": n, "sites": {category: {site: count}}, "large_gathers": {"operand shape": count}}.
  A gather is large when its operand (the table it reads from) is at least LARGE_GATHER_BYTES. Host transfers are
  infeed / outfeed / send / recv and custom calls that move data to or from the host.
  """
  shapes, entries = {}, []
  for line in hlo_text.splitlines():
    parsed = _split_instruction(line)
    if parsed:
      shapes[parsed[0]] = parsed[1]
      entries.append(parsed)
  counts = collections.Counter()
  sites = collections.defaultdict(collections.Counter)
  large = collections.Counter()
  for name, shape, op, operands, attrs in entries:
    category = None
    if op in ("scatter", "while", "conditional", "sort"):
      category = op
    elif op == "gather":
      category = "gather"
      table = shapes.get(operands[0], "") if operands else ""
      if _array_bytes(table) >= LARGE_GATHER_BYTES:
        counts["gather_large"] += 1
        sites["gather_large"][_site(attrs)] += 1
        large[re.sub(r"\{[^}]*\}", "", table)] += 1
    elif op in _HOST_OPS or (op == "custom-call" and re.search(r'custom_call_target="[^"]*(?:[Hh]ost|MoveToDevice)',
                                                                   attrs)):
      category = "host_transfer"
    if category:
      counts[category] += 1
      sites[category][_site(attrs)] += 1
    if "f64[" in shape and op not in ("parameter", "get-tuple-element", "tuple", "bitcast"):
      counts["f64"] += 1
      sites["f64"][_site(attrs)] += 1
  out = {key: counts[key] for key in ("scatter", "gather", "gather_large", "while", "conditional", "sort",
                                       "host_transfer", "f64")}
  out["sites"] = {key: dict(value.most_common()) for key, value in sorted(sites.items())}
  out["large_gathers"] = dict(large.most_common())
  return out
