"""The ``rockq`` command line: a thin Typer layer over :mod:`transform_core`."""
