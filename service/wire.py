"""The messages between a worker and its model process (service/model_process.py), without pickle.

A message is one JSON header (a dict) followed by its tensors, each sent as raw bytes; the header
lists every tensor's name, dtype and shape. Nothing received is ever unpickled: a message can only
become a dict of JSON values and tensors of the listed dtypes.

Tasks (service/jobs.py) and their results cross as their dataclass fields: tensors by name, plain
values (int, float, str, bool, None) in the header. A callback field (a sampling task's ``on_row``)
crosses as a flag saying whether the caller wants rows reported; the other side reports them as
messages of their own.
"""

from __future__ import annotations

import dataclasses
import json
import math
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor

from service.jobs import EncodeTask, SampleResult, SampleTask, ScoreTask, Task

TASK_TYPES: dict[str, type[Task[Any]]] = {t.op: t for t in (ScoreTask, EncodeTask, SampleTask)}
_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
DTYPES = {str(d): d for d in (*_INTS, torch.float16, torch.float32, torch.float64)}
CALLBACKS = ("on_row",)  # task fields that are callbacks: sent as "wanted or not"


class WireError(ValueError):
    """A message that does not follow the format."""


def send(conn: Connection, header: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> None:
    """Send ``header`` and ``tensors`` (each moved to the CPU, made contiguous) as one message: one
    write of a 4-byte header length, the JSON header, then every tensor's raw bytes in order (one
    write, so the receiver wakes once per message, not once per tensor)."""
    tensors = tensors or {}
    arrays = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    for t in arrays.values():
        if str(t.dtype) not in DTYPES:
            raise WireError(f"tensor dtype {t.dtype} cannot cross to the model process")
    specs = [{"name": k, "dtype": str(t.dtype), "shape": list(t.shape)} for k, t in arrays.items()]
    head = json.dumps({**header, "tensors": specs}).encode()
    parts = [len(head).to_bytes(4, "big"), head, *(t.numpy().tobytes() for t in arrays.values())]
    conn.send_bytes(b"".join(parts))


def recv(conn: Connection) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Receive one message: (header, tensors by name). EOFError once the other side has gone."""
    frame = conn.recv_bytes()
    size = int.from_bytes(frame[:4], "big")
    header = json.loads(frame[4 : 4 + size])
    if not isinstance(header, dict):
        raise WireError("a message header must be a JSON object")
    tensors = {}
    offset = 4 + size
    for spec in header.pop("tensors", []):
        dtype = DTYPES.get(spec["dtype"])
        if dtype is None:
            raise WireError(f"unknown tensor dtype {spec['dtype']!r}")
        shape = [int(s) for s in spec["shape"]]
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(frame):
            raise WireError(f"tensor {spec['name']!r} runs past the end of its message")
        raw = bytearray(frame[offset : offset + nbytes])  # its own (aligned, writable) memory
        t = torch.frombuffer(raw, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        tensors[spec["name"]] = t.reshape(shape)
        offset += nbytes
    if offset != len(frame):
        raise WireError(f"{len(frame) - offset} bytes after the last tensor of a message")
    return header, tensors


def _split(obj: Any, prefix: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A dataclass's fields: (plain values, tensors keyed ``prefix.field``); callbacks as flags."""
    plain: dict[str, Any] = {}
    tensors: dict[str, Tensor] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.name in CALLBACKS:
            plain[f.name] = v is not None
        elif isinstance(v, Tensor):
            tensors[f"{prefix}.{f.name}"] = v
        elif v is None or isinstance(v, int | float | str | bool):
            plain[f.name] = v
        else:
            raise WireError(f"{type(obj).__name__}.{f.name} ({type(v).__name__}) cannot cross to the model process")
    return plain, tensors


def _fields(plain: dict[str, Any], tensors: dict[str, Tensor], prefix: str) -> dict[str, Any]:
    got = dict(plain)
    got.update({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    return got


def tasks_message(tasks: list[Task[Any]]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One batch of tasks of one type: (header part, tensors)."""
    op = type(tasks[0]).op
    parts, tensors = [], {}
    for i, task in enumerate(tasks):
        plain, ts = _split(task, f"t{i}")
        parts.append(plain)
        tensors.update(ts)
    return {"op": op, "tasks": parts}, tensors


def tasks_from(header: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[type[Task[Any]], list[Any]]:
    """The task type and the tasks of a :func:`tasks_message` (callback flags left as booleans: the
    receiver puts its own callbacks in their place)."""
    task_type = TASK_TYPES.get(header.get("op", ""))
    if task_type is None:
        raise WireError(f"unknown task op {header.get('op')!r}")
    return task_type, [task_type(**_fields(plain, tensors, f"t{i}")) for i, plain in enumerate(header["tasks"])]


def results_message(results: list[Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One result per task (a dict of tensors, a :class:`SampleResult`, or None): (header part, tensors)."""
    kinds, tensors = [], {}
    for i, r in enumerate(results):
        if r is None:
            kinds.append("none")
        elif isinstance(r, SampleResult):
            kinds.append("sample")
            _, ts = _split(r, f"r{i}")
            tensors.update(ts)
        elif isinstance(r, dict):
            kinds.append("tensors")
            tensors.update({f"r{i}.{k}": v for k, v in r.items()})
        else:
            raise WireError(f"a result of type {type(r).__name__} cannot cross from the model process")
    return {"results": kinds}, tensors


def results_from(header: dict[str, Any], tensors: dict[str, Tensor]) -> list[Any]:
    """The results of a :func:`results_message`, in task order."""
    out: list[Any] = []
    for i, kind in enumerate(header["results"]):
        mine = _fields({}, tensors, f"r{i}")
        if kind == "none":
            out.append(None)
        elif kind == "sample":
            out.append(SampleResult(images=mine["images"], log_prob=mine.get("log_prob")))
        elif kind == "tensors":
            out.append(mine)
        else:
            raise WireError(f"unknown result kind {kind!r}")
    return out
