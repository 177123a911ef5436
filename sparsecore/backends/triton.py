"""The ``triton`` backend (kernels in ``sparsecore.kernels``)."""


def available():
    return False, "not built yet"


def supports(x, values):
    return False
