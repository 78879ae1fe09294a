"""Reads the names convflow writes as text (paths.txt, classes.txt,
skipped.csv, the manifest) back to the exact bytes of the file names.

The escaping (src/names.rs): a backslash is written \\\\, a newline \\n, a
carriage return \\r, a tab \\t, a byte that is not part of valid UTF-8
\\xHH; everything else as itself. Every name is one line of valid UTF-8.

    from convflow_names import read_lines
    paths = read_lines("out/train/paths.txt")   # bytes; os.fsdecode() for str
"""
import re

_ESCAPE = re.compile(rb"\\(x[0-9a-f]{2}|[\\nrt])")
_SIMPLE = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}


def unescape(text: bytes) -> bytes:
    """The bytes of one escaped name."""
    return _ESCAPE.sub(lambda m: _SIMPLE.get(m.group(1)) or bytes([int(m.group(1)[1:], 16)]), text)


def read_lines(path):
    """Every line of a paths.txt or classes.txt file, as the names' bytes."""
    with open(path, "rb") as f:
        return [unescape(line) for line in f.read().split(b"\n")[:-1]]


if __name__ == "__main__":
    import sys

    for name in read_lines(sys.argv[1]):
        sys.stdout.buffer.write(name.hex().encode() + b"\n")
