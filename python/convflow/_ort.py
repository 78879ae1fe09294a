"""Which ONNX Runtime library the native module loads.

The wheel bundles none: it uses the one the `onnxruntime` (or
`onnxruntime-gpu`) package installed, found without importing that package
(importing it costs a second and loads a second copy of the library).
`ORT_DYLIB_PATH` set by the user wins; with neither, the library's own
search applies (`models/lib/` of a convflow checkout).
"""

import glob
import importlib.util
import os


def library():
    """The path of the onnxruntime package's libonnxruntime.so, or None."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        # The versioned file is the library itself (libonnxruntime.so.1.31.1);
        # the providers beside it are found from its folder.
        found = sorted(glob.glob(os.path.join(folder, "capi", "libonnxruntime.so.*")))
        found = [f for f in found if "providers" not in os.path.basename(f)]
        if found:
            return found[-1]
    return None


def ensure():
    """Points ORT_DYLIB_PATH at the onnxruntime package's library unless set."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return
    path = library()
    if path:
        os.environ["ORT_DYLIB_PATH"] = path
