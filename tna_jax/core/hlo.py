"""Reading a compiled XLA program: its computations, loops and collectives, from HLO text.

`Program(compiled.as_text())` parses what `jax.jit(f).lower(...).compile()` will run on one
device: every computation and instruction, every while loop with the trip count XLA
recorded for it (`known_trip_count`), how often each computation runs per call, and every
collective (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute) with
its device groups and bytes. `tna_jax.core.flops` uses the loops to count a scan's work once per
step (XLA's own cost analysis counts a loop body once); the communication tests use the
collectives to check what the SPMD partitioner put inside the training step.

Only what those two need is parsed; instructions are kept as text beyond their name,
result shape, opcode and operand names.
"""

import dataclasses
import functools
import math
import re

import numpy as np

# Bytes per element of XLA's primitive types (sub-byte types round up: one per element).
DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f4e2m1fn": 1, "f8e3m4": 1, "f8e4m3": 1,
    "f8e4m3fn": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2": 1, "f8e5m2fnuz": 1, "f8e8m0fnu": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
    "c64": 8, "c128": 16, "token": 0,
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([^\s(]+) \(.*\) -> .*\{$")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%?([^\s=]+) = (.*)$")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation|"
                     r"branch_computations|called_computations)=(\{[^}]*\}|%?[^\s,{}]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """[(dtype, dims)] of every array in a shape string ('f32[2,3]{1,0}' or a tuple of them)."""
  return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(shape)
          if dtype in DTYPE_BYTES]


def shape_bytes(shape: str) -> int:
  """Bytes of all arrays in a shape string."""
  return sum(DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in shape_dims(shape))


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  shape: str  # the result's shape, e.g. 'f32[24,36]{1,0}' or '(f32[24]{0}, f32[])'
  operands: tuple[str, ...]  # names of the operand instructions
  attributes: str  # everything after the operand list
  computation: str


@dataclasses.dataclass(frozen=True)
class Loop:
  """A while instruction; `trip_count` is None where XLA could not tell it."""
  instruction: str
  computation: str  # where the while instruction stands
  body: str
  condition: str
  trip_count: int | None


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective as it runs on each device.

  `groups` are the device groups (positions in the compiled program's device assignment,
  i.e. in `mesh.devices.flat` order) that communicate, sorted; for collective-permute the
  (source, target) pairs. `operand_bytes` is what each device contributes, `result_bytes`
  what it receives. `runs` is how often it runs per call of the program (the product of the
  trip counts of the loops around it; None if one is unknown) and `loop_depth` how many
  loops enclose it (0 = runs once per call).
  """
  name: str
  kind: str  # 'all-reduce', 'all-gather', ... ('-start' variants folded in)
  computation: str
  groups: tuple[tuple[int, ...], ...]
  operand_shapes: tuple[str, ...]
  result_shape: str
  operand_bytes: int
  result_bytes: int
  runs: int | None
  loop_depth: int

  @property
  def operand_dims(self) -> list[tuple[int, ...]]:
    return [dims for shape in self.operand_shapes for _, dims in shape_dims(shape)]

  @property
  def result_dims(self) -> list[tuple[int, ...]]:
    return [dims for _, dims in shape_dims(self.result_shape)]


class Program:
  """A parsed HLO module (the text of `compiled.as_text()`)."""

  def __init__(self, text: str):
    self.text = text
    self.computations: dict[str, list[Instruction]] = {}
    self.entry = ""
    current = None
    for line in text.splitlines():
      line = re.sub(r"/\*.*?\*/", "", line).strip()
      header = _COMPUTATION.match(line)
      if header:
        current = header.group(2)
        self.computations[current] = []
        if header.group(1):
          self.entry = current
      elif line == "}":
        current = None
      elif current is not None:
        instruction = _parse_instruction(line, current)
        if instruction:
          self.computations[current].append(instruction)
    if not self.entry:
      raise ValueError("no ENTRY computation in the HLO text")
    self.instructions = {(i.computation, i.name): i for c in self.computations.values() for i in c}
    self.loops = [Loop(i.name, i.computation, _called(i.attributes, "body"), _called(i.attributes, "condition"),
                       int(m.group(1)) if (m := _TRIP_COUNT.search(i.attributes)) else None)
                  for c in self.computations.values() for i in c if i.opcode == "while"]
    self.callers: dict[str, list[tuple[str, float | None]]] = {}  # computation -> [(caller, runs per caller run)]
    for c in self.computations.values():
      for i in c:
        for callee in _callees(i.attributes):
          if i.opcode == "while" and callee in (_called(i.attributes, "body"), _called(i.attributes, "condition")):
            trips = next(loop.trip_count for loop in self.loops if loop.computation == i.computation
                         and loop.instruction == i.name)
            per_run = None if trips is None else trips + (callee == _called(i.attributes, "condition"))
          else:
            per_run = 1
          self.callers.setdefault(callee, []).append((i.computation, per_run))

  def scope(self, computation: str) -> str:
    """The entry or loop body/condition whose every run runs `computation` (once or more)."""
    loop_parts = {name for loop in self.loops for name in (loop.body, loop.condition)}
    while computation != self.entry and computation not in loop_parts:
      computation = self.callers[computation][0][0]
    return computation

  @functools.cache
  def runs(self, computation: str) -> int | None:
    """How often `computation` runs per call of the program (loops multiply, None = unknown)."""
    if computation == self.entry:
      return 1
    total = 0
    for caller, per_run in self.callers.get(computation, []):
      caller_runs = self.runs(caller)
      if caller_runs is None or per_run is None:
        return None
      total = max(total, caller_runs * per_run)  # shared reducers count by their busiest caller
    return total

  @functools.cache
  def loop_depth(self, computation: str) -> int:
    """How many while loops enclose `computation`."""
    if computation == self.entry:
      return 0
    bodies = {name for loop in self.loops for name in (loop.body, loop.condition)}
    return max((self.loop_depth(caller) + (computation in bodies) for caller, _ in self.callers.get(computation, [])),
               default=0)

  def shape_of(self, computation: str, name: str) -> str:
    return self.instructions[(computation, name)].shape

  def collectives(self) -> list[Collective]:
    """Every collective of the program, `-start`/`-done` pairs counted once (at the start)."""
    out = []
    for c in self.computations.values():
      for i in c:
        kind = i.opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
          continue
        operand_shapes = tuple(self.shape_of(i.computation, o) for o in i.operands)
        if kind == "collective-permute":
          pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", i.attributes)
          groups = tuple(sorted(tuple(int(x) for x in p.split(",")) for p in
                                re.findall(r"\{(\d+,\d+)", pairs.group(0)))) if pairs else ()
        else:
          groups = replica_groups(i.attributes)
        result = i.shape
        if i.opcode.endswith("-start"):  # async: the result tuple holds the operands, then the results
          result = _async_result(i.shape, len(i.operands))
        out.append(Collective(i.name, kind, i.computation, groups, operand_shapes, result,
                              sum(shape_bytes(s) for s in operand_shapes), shape_bytes(result),
                              self.runs(i.computation), self.loop_depth(i.computation)))
    return out

  def with_entry(self, computation: str) -> str:
    """The module's text with `computation` as its ENTRY (for cost analysis of one loop body).

    The header keeps the module's name and device counts only (its schedule, aliasing and
    entry layout describe the old entry); every computation stays, and those no longer
    reachable are ignored.
    """
    lines = self.text.splitlines()
    kept = re.findall(r", ((?:num_partitions|replica_count)=\d+)", lines[0])
    header = lines[0].split(",")[0] + "".join(f", {attribute}" for attribute in kept)
    body = []
    for line in lines[1:]:
      match = _COMPUTATION.match(line.strip())
      if match:
        line = re.sub(r"^ENTRY ", "", line)
        if match.group(2) == computation:
          line = "ENTRY " + line
      body.append(line)
    return "\n".join([header] + body)


def _parse_instruction(line: str, computation: str) -> Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  name, rest = match.groups()
  shape, rest = _split_shape(rest)
  opcode_match = re.match(r"([\w\-]+)\(", rest)
  if not opcode_match:
    return None
  end = _matching(rest, len(opcode_match.group(0)) - 1)
  operands = tuple(re.findall(r"%?([^\s,%]+)\s*$", part)[0] for part in _split_top(rest[len(opcode_match.group(0)):end])
                   if part.strip() and re.findall(r"%?([^\s,%]+)\s*$", part))
  return Instruction(name, opcode_match.group(1), shape, operands, rest[end + 1:], computation)


def _split_shape(text: str) -> tuple[str, str]:
  if text.startswith("("):
    end = _matching(text, 0)
    return text[:end + 1], text[end + 1:].lstrip()
  shape, _, rest = text.partition(" ")
  return shape, rest


def _matching(text: str, start: int) -> int:
  """Index of the bracket closing the one at `start`."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  depth, opening = 0, text[start]
  for k in range(start, len(text)):
    if text[k] == opening:
      depth += 1
    elif text[k] == pairs[opening]:
      depth -= 1
      if depth == 0:
        return k
  raise ValueError(f"unbalanced {opening!r} in {text[:200]!r}")


def _split_top(text: str) -> list[str]:
  """`text` split at commas outside brackets."""
  parts, depth, start = [], 0, 0
  for k, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:k])
      start = k + 1
  parts.append(text[start:])
  return parts


def _callees(attributes: str) -> list[str]:
  return [name.lstrip("%").strip() for value in _CALLED.findall(attributes)
          for name in value.strip("{}").split(",") if name.strip()]


def _called(attributes: str, key: str) -> str:
  match = re.search(rf"\b{key}=%?([^\s,{{}}]+)", attributes)
  return match.group(1) if match else ""


def _async_result(shape: str, num_operands: int) -> str:
  parts = _split_top(shape[1:-1]) if shape.startswith("(") else [shape]
  return ", ".join(p.strip() for p in parts[num_operands:num_operands + 1]) or shape


def replica_groups(attributes: str) -> tuple[tuple[int, ...], ...]:
  """The device groups of a collective's `replica_groups=`, sorted (each group sorted).

  Reads the three ways XLA prints them: explicit lists `{{0,1},{2,3}}`, iota lists
  `[2,4]<=[4,2]T(1,0)`, and mesh axes `mesh['a'=2,'b'=4] {'b'}` (optionally with
  `device_ids=([..]T(..))` and sub-axes `'a':(2)4`). `{}` (every device in one group) comes
  back as ().
  """
  match = re.search(r"replica_groups=(.*)", attributes)
  if not match:
    return ()
  text = match.group(1)
  if text.startswith("{"):
    body = text[:_matching(text, 0) + 1]
    groups = [tuple(int(x) for x in g.split(",") if x) for g in re.findall(r"\{([\d,]*)\}", body[1:-1])]
  elif text.startswith("["):
    iota = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    groups = _iota(iota.group(3), iota.group(4)).reshape(int(iota.group(1)), int(iota.group(2))).tolist()
  elif text.startswith("mesh["):
    groups = _mesh_groups(text)
  else:
    raise ValueError(f"unknown replica_groups format: {text[:120]!r}")
  return tuple(sorted(tuple(sorted(g)) for g in groups))


def _iota(dims: str, perm: str | None) -> np.ndarray:
  shape = [int(d) for d in dims.split(",")]
  ids = np.arange(math.prod(shape)).reshape(shape)
  return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def _mesh_groups(text: str) -> list[list[int]]:
  axes_text = text[len("mesh["):_matching(text, len("mesh"))]
  axes = [(n.strip("'"), int(s)) for n, s in re.findall(r"('?[^=,']+'?)=(\d+)", axes_text)]
  rest = text[len("mesh[") + len(axes_text) + 1:]
  device_ids = re.match(r",\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\)", rest)
  ids = (_iota(device_ids.group(1), device_ids.group(2)) if device_ids
         else np.arange(math.prod(s for _, s in axes))).reshape([s for _, s in axes])
  selected = rest[rest.index("{") + 1:_matching(rest, rest.index("{"))]
  names = [n for n, _ in axes]
  split_shape, grouped = [], []
  refs = {}
  for ref in _split_top(selected):
    sub = re.match(r"\s*'?([^':]+)'?(?::\((\d+)\)(\d+))?", ref)
    refs[sub.group(1)] = (int(sub.group(2)), int(sub.group(3))) if sub.group(2) else None
  for name, size in axes:  # split each axis that a sub-axis names into (before, sub-axis, after)
    if name in refs and refs[name] is not None:
      pre, sub_size = refs[name]
      grouped.append(len(split_shape) + 1)
      split_shape += [pre, sub_size, size // (pre * sub_size)]
    else:
      if name in refs:
        grouped.append(len(split_shape))
      split_shape.append(size)
  unknown = set(refs) - set(names)
  if unknown:
    raise ValueError(f"replica group axes {sorted(unknown)} not in the mesh {names}")
  ids = ids.reshape(split_shape)
  kept = [d for d in range(ids.ndim) if d not in grouped]
  group_size = math.prod(split_shape[d] for d in grouped)
  return ids.transpose(kept + grouped).reshape(-1, group_size).tolist()
