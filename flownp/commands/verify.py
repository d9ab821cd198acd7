"""flownp verify (not implemented yet)."""

HELP = "verify (not implemented yet)"


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("flownp verify: not implemented yet")
