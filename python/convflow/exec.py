"""Worker side of convflow's `exec` stage (protocol version 1), numpy only.

    # my_transform.py
    from convflow import exec as convflow_exec   # or, without the wheel: import convflow_exec (PYTHONPATH=python)

    def invert(img, meta):          # img: writable uint8 array [H, W, 3] ([H, W, 1] gray); meta: dict
        return 255 - img            # uint8 [H', W', C] back (any size, the same C)

    convflow_exec.serve(invert)

    # pipeline.yaml
    - {id: invert, kind: exec, input: resize, workers: 2,
       command: [.venv/bin/python, my_transform.py], env: {PYTHONPATH: python}}

`meta` holds the item's `seq`, `path`, `hash` (blake3 hex of the file),
`label` (index or None), `class` (name or None), `split`, `epoch`. An
exception in `fn` becomes an item error (the item is skipped and listed, or
the run fails under `on_error: fail`); the worker keeps serving. `print()`
goes to stderr (convflow's log), never into the protocol stream.

Framing (both directions): b"convflow-exec/1\\n", a u32 little-endian header
length, a UTF-8 JSON header, then `nbytes` payload bytes (C order). The
worker first sends {"ready": true, "protocol": 1}; then, per request, an
answer {"seq", "ok": true, "shape", "dtype", "nbytes"} + bytes, or
{"seq", "ok": false, "error"}. It exits when its input ends. See
src/stages/exec.rs for the full specification.
"""

import json
import signal
import struct
import sys
import traceback

import numpy as np

MAGIC = b"convflow-exec/1\n"
PROTOCOL = 1
DTYPES = {"uint8": np.uint8, "float32": np.float32}
META_KEYS = ("seq", "path", "hash", "label", "class", "split", "epoch")


class ProtocolError(Exception):
    pass


def _read_exact(stream, n, eof_ok=False):
    """n bytes as a writable bytearray; None at a clean end of input when eof_ok."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            if got == 0 and eof_ok:
                return None
            raise ProtocolError(f"input ended after {got} of {n} bytes")
        got += k
    return buf


def _write_frame(stream, header, payload=None):
    head = json.dumps(header, separators=(",", ":")).encode()
    stream.write(MAGIC + struct.pack("<I", len(head)) + head)
    if payload is not None:
        stream.write(payload)
    stream.flush()


def read_request(stream):
    """(header, array) for the next request, or None at end of input."""
    magic = _read_exact(stream, len(MAGIC), eof_ok=True)
    if magic is None:
        return None
    if bytes(magic) != MAGIC:
        raise ProtocolError(f"expected {MAGIC!r}, got {bytes(magic)!r}")
    (length,) = struct.unpack("<I", _read_exact(stream, 4))
    header = json.loads(_read_exact(stream, length))
    payload = _read_exact(stream, header.get("nbytes") or 0)
    dtype = DTYPES[header["dtype"]]
    array = np.frombuffer(payload, dtype=dtype).reshape(header["shape"])
    return header, array


def serve(fn, stdin=None, stdout=None):
    """Answers requests with fn(array, meta) until the input ends."""
    inp = stdin if stdin is not None else sys.stdin.buffer
    out = stdout if stdout is not None else sys.stdout.buffer
    if stdout is None:
        # Anything fn prints must not corrupt the frames on stdout.
        sys.stdout = sys.stderr
    # convflow handles Ctrl-C and closes our input when it has drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _write_frame(out, {"ready": True, "protocol": PROTOCOL})
    while True:
        request = read_request(inp)
        if request is None:
            return
        header, array = request
        meta = {k: header.get(k) for k in META_KEYS}
        try:
            result = np.ascontiguousarray(fn(array, meta))
            name = result.dtype.name
            if name not in DTYPES:
                raise TypeError(f"fn returned dtype {name}; the protocol carries {', '.join(DTYPES)}")
        except Exception as e:  # the item fails, the worker goes on
            traceback.print_exc(file=sys.stderr)
            _write_frame(out, {"seq": header["seq"], "ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        answer = {"seq": header["seq"], "ok": True, "shape": list(result.shape), "dtype": name, "nbytes": result.nbytes}
        _write_frame(out, answer, memoryview(result).cast("B"))
