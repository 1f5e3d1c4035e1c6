"""Test-only: read back what an offline W&B run logged, from its binary ``run-*.wandb`` file.

``read_offline_run(<run_dir>/wandb)`` -> ``{"run": {name, group, project}, "config", "history", "summary"}``.
The file is a 7-byte header, then LevelDB-log style chunks (crc32, length, type) in 32 KiB blocks, each record a
``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_MAGIC = b":W&B"
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path}: not a W&B run file (starts with {data[:4]!r}, expected {_MAGIC!r})")
    pos, out, buf = 7, [], b""
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # the writer pads a block's tail that cannot hold a chunk header
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        pos += _CHUNK_HEADER
        if kind == 0 and length == 0:
            break
        buf += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            out.append(buf)
            buf = b""
    return out


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """What an offline run logged: ``{"run": {name, group, project}, "config", "history": [...], "summary",
    "artifacts": [{name, type, files}]}``.

    ``run_dir`` is ``wandb/offline-run-*`` or any directory above exactly one of them.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).rglob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {run_dir}, found {[str(f) for f in files]}")
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}, "artifacts": []}

    def value(item: Any) -> Any:
        return json.loads(item.value_json)

    def key(item: Any) -> str:
        return "/".join(item.nested_key) if item.nested_key else item.key

    for raw in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            # a run may be re-sent with only some fields set: keep what is known
            fields = {"name": rec.run.display_name, "group": rec.run.run_group, "project": rec.run.project}
            out["run"].update({k: v for k, v in fields.items() if v})
            out["config"].update({key(i): value(i) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({key(i): value(i) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({key(i): value(i) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): value(i) for i in rec.summary.update})
        elif kind == "artifact":
            files = [entry.path for entry in rec.artifact.manifest.contents]
            out["artifacts"].append(
                {"name": rec.artifact.name, "type": rec.artifact.type, "files": sorted(files)}
            )
    return out
