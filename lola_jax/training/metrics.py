"""Metrics: JSON lines, TensorBoard event files (no TensorFlow needed), progress lines.

The TensorBoard writer emits the TFRecord framing (length, masked CRC32C, payload, masked CRC32C)
around hand-encoded `Event` protos holding scalar `Summary` values: what TensorBoard reads from
`events.out.tfevents.*` files.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

# CRC32C (Castagnoli), table-driven; TFRecord masks it as ((crc >> 15) | (crc << 17)) + 0xa282ead8.
_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field_bytes(num: int, payload: bytes) -> bytes:
  return _varint((num << 3) | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, scalars=None) -> bytes:
  msg = _varint((1 << 3) | 1) + struct.pack("<d", wall_time)  # wall_time: double
  msg += _varint((2 << 3) | 0) + _varint(step & 0xFFFFFFFFFFFFFFFF)  # step: int64
  if file_version is not None:
    msg += _field_bytes(3, file_version.encode())
  if scalars:
    summary = b""
    for tag, value in scalars.items():
      val = _field_bytes(1, tag.encode()) + _varint((2 << 3) | 5) + struct.pack("<f", value)
      summary += _field_bytes(1, val)
    msg += _field_bytes(5, summary)
  return msg


class TensorBoardWriter:
  """Scalar summaries to `<logdir>/events.out.tfevents.<time>.<host>`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._write(_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._f.write(header + struct.pack("<I", _masked_crc(header)))
    self._f.write(data + struct.pack("<I", _masked_crc(data)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    values = {
      k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)
    }
    if values:
      self._write(_event(time.time(), step, scalars=values))
      self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
  """Parse scalar events back (for tests): [(step, {tag: value})]."""

  def fields(buf):
    i = 0
    while i < len(buf):
      key, i = _read_varint(buf, i)
      num, wire = key >> 3, key & 7
      if wire == 0:
        val, i = _read_varint(buf, i)
      elif wire == 1:
        val, i = buf[i : i + 8], i + 8
      elif wire == 5:
        val, i = buf[i : i + 4], i + 4
      else:
        n, i = _read_varint(buf, i)
        val, i = buf[i : i + n], i + n
      yield num, val

  out = []
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i : i + 8])
    header_crc = struct.unpack("<I", data[i + 8 : i + 12])[0]
    if header_crc != _masked_crc(data[i : i + 8]):
      raise ValueError("bad record header CRC")
    payload = data[i + 12 : i + 12 + n]
    if struct.unpack("<I", data[i + 12 + n : i + 16 + n])[0] != _masked_crc(payload):
      raise ValueError("bad record CRC")
    i += 16 + n
    step, scalars = 0, {}
    for num, val in fields(payload):
      if num == 2:
        step = val
      elif num == 5:
        for _, v in fields(val):
          tag, x = None, None
          for vn, vv in fields(v):
            if vn == 1:
              tag = vv.decode()
            elif vn == 2:
              x = struct.unpack("<f", vv)[0]
          scalars[tag] = x
    if scalars:
      out.append((step, scalars))
  return out


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  shift = result = 0
  while True:
    b = buf[i]
    i += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, i
    shift += 7


def drop_rows_after(path: str, step: int) -> int:
  """Rewrites the JSON-lines file keeping only rows with 'step' <= `step`; returns how many went.

  A run that resumes from the checkpoint at `step` recomputes the steps after it: the rows the
  interrupted run wrote for them would otherwise appear twice. Lines that are not JSON objects
  with an int 'step' (a line cut short by a crash) are dropped too. The file is replaced
  atomically (a crash here leaves the old file or the new one).
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        keep = isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step
      except ValueError:
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += int(bool(line.strip()))
  if dropped:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


class MetricsWriter:
  """Appends JSON lines to `<workdir>/metrics.jsonl` and scalars to TensorBoard (process 0).

  `start_step`: the step the run starts (or resumes) from; rows after it that an interrupted
  earlier run left are dropped first, so the file holds one row per step (plus the final
  evaluation's row) however often the run was resumed.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, start_step: int | None = None):
    self.enabled = enabled
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
      if start_step is not None:
        dropped = drop_rows_after(self.jsonl_path, start_step)
        if dropped:
          print(
            f"metrics.jsonl: dropped {dropped} row(s) after step {start_step} written by the "
            "interrupted run (the resumed run writes them again)",
            flush=True,
          )
      self._jsonl = open(self.jsonl_path, "a")
      self._tb = TensorBoardWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    for k, v in values.items():
      if isinstance(v, (str, int, list)):
        record[k] = v
      else:
        record[k] = float(v) if math.isfinite(float(v)) else None  # JSON has no NaN
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    self._tb.scalars(step, {k: v for k, v in record.items() if k != "step"})

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


def progress_line(
  step: int, total: int, loss: float, tokens_per_s: float, eta_s: float, extra: str = ""
) -> str:
  speed = f"{tokens_per_s / 1000:.1f}k" if math.isfinite(tokens_per_s) else "-"
  return (
    f"step {step:>6d}/{total} | loss {loss:.4f} | {speed} tok/s | "
    f"eta {format_duration(eta_s)}" + (f" | {extra}" if extra else "")
  )
