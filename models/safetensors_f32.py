"""Reads the float32 safetensors files convflow's trainers write (heads and
convnets), with numpy alone: the format is an 8-byte little-endian header
length, a JSON header (name -> dtype, shape, byte offsets; `__metadata__`:
string -> string), then the raw little-endian data.
"""
import json
import struct

import numpy as np


def read_safetensors(path):
    """Returns ({name: float32 array}, metadata dict); a tensor of another
    dtype is an error naming the file and the tensor."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise SystemExit(f"{path}: tensor {name} is {info['dtype']}, only F32 is read")
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"])
    return out, header.get("__metadata__", {})


def write_safetensors(path, tensors, metadata):
    """Writes {name: array} as float32 safetensors with string `metadata`,
    in name order (what the safetensors crate itself writes). The header is
    padded with spaces to a multiple of 8 bytes, as the format asks."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a.tobytes())
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
