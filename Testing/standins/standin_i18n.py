"""Stand-in for ``slicer.i18n``: no translation."""


def tr(text: str) -> str:
    return text


def translate(context: str, text: str) -> str:
    return text
