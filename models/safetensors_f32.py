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
