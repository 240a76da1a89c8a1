"""Stand-in for ``slicer.parameterNodeWrapper``: typed fields stored in a vtkMRMLScriptedModuleNode.

Strings, numbers and booleans are node parameters; MRML node fields (or Unions of them) are node references.
No GUI binding (``connectGui`` needs Qt widgets).
"""

from __future__ import annotations

import typing


class Choice:
    def __init__(self, choices) -> None:
        self.choices = list(choices)


class WithinRange:
    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum


def _base(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _is_node(kind) -> bool:
    """An MRML node class, or a Union of them (with None)."""
    if typing.get_origin(kind) is typing.Union:
        return all(a is type(None) or _is_node(a) for a in typing.get_args(kind))
    return isinstance(kind, type) and kind.__name__.startswith("vtkMRML")


def parameterNodeWrapper(cls):
    fields = {name: _base(ann) for name, ann in typing.get_type_hints(cls, include_extras=True).items()}
    defaults = {name: getattr(cls, name) for name in fields if hasattr(cls, name)}

    def __init__(self, node) -> None:
        object.__setattr__(self, "parameterNode", node)

    def __getattr__(self, name):
        if name not in fields:
            raise AttributeError(name)
        node, kind = self.parameterNode, fields[name]
        if _is_node(kind):
            return node.GetNodeReference(name)
        raw = node.GetParameter(name)
        if raw == "":
            return defaults.get(name)
        if kind is bool:
            return raw == "true"
        return kind(raw)

    def __setattr__(self, name, value) -> None:
        if name not in fields:
            raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
        node, kind = self.parameterNode, fields[name]
        if _is_node(kind):
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif kind is bool:
            node.SetParameter(name, "true" if value else "false")
        else:
            node.SetParameter(name, str(value))

    namespace = {"__init__": __init__, "__getattr__": __getattr__, "__setattr__": __setattr__,
                 "__doc__": cls.__doc__, "allFields": staticmethod(lambda: dict(fields))}
    return type(cls.__name__, (), namespace)
