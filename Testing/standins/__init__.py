"""Stand-ins for the parts of 3D Slicer that only exist in the desktop application (qt, ctk,
slicer.ScriptedLoadableModule, slicer.i18n, slicer.parameterNodeWrapper).

They are NOT Slicer: just enough surface for importing the scripted module file and running its logic and test
class against the real MRML core (slicer-core). ``install()`` puts them into ``sys.modules``; ``uninstall()`` takes
them out again.
"""

from __future__ import annotations

import sys
import types

from . import standin_ctk, standin_i18n, standin_parameter_node_wrapper, standin_qt, standin_scripted_module

_NAMES = {
    "qt": standin_qt,
    "ctk": standin_ctk,
    "slicer.ScriptedLoadableModule": standin_scripted_module,
    "slicer.i18n": standin_i18n,
    "slicer.parameterNodeWrapper": standin_parameter_node_wrapper,
}
_saved: dict[str, types.ModuleType | None] = {}


def install() -> None:
    import slicer

    for name, module in _NAMES.items():
        _saved.setdefault(name, sys.modules.get(name))
        sys.modules[name] = module
        if name.startswith("slicer."):
            setattr(slicer, name.split(".", 1)[1], module)


def uninstall() -> None:
    import slicer

    for name, previous in _saved.items():
        if previous is None:
            sys.modules.pop(name, None)
            if name.startswith("slicer.") and hasattr(slicer, name.split(".", 1)[1]):
                delattr(slicer, name.split(".", 1)[1])
        else:
            sys.modules[name] = previous
    _saved.clear()
