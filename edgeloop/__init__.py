"""The ``edgeloop`` command: a thin shell over runtime/, cloud/ and devices/."""

__version__ = "0.1.0"
