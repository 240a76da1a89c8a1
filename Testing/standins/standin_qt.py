"""Stand-in for PythonQt's ``qt`` module (only names the module file touches at import or in its logic)."""


class QDir:
    @staticmethod
    def homePath() -> str:
        import os

        return os.path.expanduser("~")


class QColor:
    def __init__(self, r: int = 0, g: int = 0, b: int = 0) -> None:
        self.rgb = (r, g, b)


class QTableWidgetItem:
    def __init__(self, text: str = "") -> None:
        self._text = text
        self.background = None

    def text(self) -> str:
        return self._text

    def setBackground(self, color) -> None:
        self.background = color
