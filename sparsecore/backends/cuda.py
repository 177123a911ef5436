"""The ``cuda`` backend (kernels in ``sparsecore._C``)."""


def available():
    return False, "not built yet"


def supports(x, values):
    return False
