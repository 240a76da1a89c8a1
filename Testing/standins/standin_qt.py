"""Stand-in for PythonQt's ``qt`` module (only names the module file touches at import or in its logic)."""


class QDir:
    @staticmethod
    def homePath() -> str:
        import os

        return os.path.expanduser("~")
