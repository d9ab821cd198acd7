"""Subcommands of the ``flownp`` command line (see :mod:`flownp.cli`)."""
