"""Compatibility path of the `exec` worker helper, which now lives in the
package as `convflow.exec` (`from convflow import exec as convflow_exec`).

Pipelines that set `env: {PYTHONPATH: python}` and `import convflow_exec`
keep working without the wheel installed: this loads convflow/exec.py by
its path, so neither the package nor its native module is imported.
"""

import importlib.util as _util
import os as _os
import sys as _sys

_spec = _util.spec_from_file_location(
    "convflow_exec", _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "convflow", "exec.py")
)
_module = _util.module_from_spec(_spec)
_sys.modules[__name__] = _module
_spec.loader.exec_module(_module)
