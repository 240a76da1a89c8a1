"""Stand-in for ``slicer.ScriptedLoadableModule``: the four base classes, without Qt.

The logic's parameter node is a real ``vtkMRMLScriptedModuleNode`` in ``slicer.mrmlScene``, as in Slicer.
"""

from __future__ import annotations

import logging
import os
import sys
import unittest

import slicer


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""
        slicer.selfTests = getattr(slicer, "selfTests", {})
        slicer.selfTests[self.moduleName] = self.runTest

    def resourcePath(self, filename: str) -> str:
        module_file = sys.modules[self.__class__.__module__].__file__
        return os.path.join(os.path.dirname(module_file), "Resources", filename)

    def runTest(self, msec: int = 100, **kwargs) -> None:
        raise NotImplementedError


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__[: -len("Widget")]

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.moduleName = self.__class__.__name__[: -len("Logic")]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetName(self.moduleName)
            node.SetModuleName(self.moduleName)
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        logging.info(message)

    def runTest(self) -> None:
        raise NotImplementedError
