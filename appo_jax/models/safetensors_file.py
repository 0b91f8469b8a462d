"""Minimal safetensors reader / writer on NumPy memmaps (bfloat16 via ml_dtypes, which safetensors.numpy lacks).

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
"__metadata__": {...}}, then the tensor bytes (offsets relative to the end of the header).
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A missing, truncated or malformed safetensors file (the message names the file)."""


def read_header(path: str) -> tuple[dict, int]:
    """(tensor entries of the JSON header, byte offset where the data starts); SafetensorsError when the file
    is truncated or malformed or a tensor's byte range lies outside the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise SafetensorsError(f"weight file not found: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            count = int(np.prod(entry["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: corrupt or unsupported header entry for tensor {name!r}: {entry}") from e
        if end - begin != count * dtype.itemsize or begin < 0 or data_start + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} bytes [{begin}, {end}) do not fit its shape {entry['shape']} "
                f"{entry['dtype']} or the file ({size - data_start} data bytes): file truncated or corrupt"
            )
    return header, data_start


class SafetensorsFile:
    """Lazy access to the tensors of one .safetensors file: `names`, `shape(name)`, `get(name)` (read-only
    memmap view; slicing it reads only the touched bytes)."""

    def __init__(self, path: str):
        self.path = path
        self._header, self._start = read_header(path)
        self._mmap = None

    @property
    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self._header[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._start + begin: self._start + end]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> array of a dtype in DTYPES) to `path` with metadata {"format": "pt", ...}
    (transformers requires the "format" key)."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES:
            raise TypeError(f"cannot write tensor {name!r} of dtype {array.dtype} to safetensors")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
