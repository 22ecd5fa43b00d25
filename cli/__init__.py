"""The ``rockq`` command line: a thin Typer layer over :mod:`transform_core`.

- :mod:`cli.main`: the Typer app, the ``rockq`` entry point, error handling and exit codes.
- :mod:`cli.quantise_commands`: ``inspect``, ``patch``, ``burn-in``, ``quantize``, ``report``.
- :mod:`cli.finetune_command`: ``finetune``, and the run ``patch --finetune`` shares with it.
- :mod:`cli.info_commands`: ``recipes``, ``transforms``, ``demo``.
- Shared by the commands: :mod:`cli.options` (option types), :mod:`cli.inputs` (reading
  networks and checkpoints), :mod:`cli.output` (console and progress bars),
  :mod:`cli.render` (Rich tables). Writing outputs with their reports is
  :mod:`transform_core.outputs`.
"""
