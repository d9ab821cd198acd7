"""flownp evaluate (not implemented yet)."""

HELP = "evaluate (not implemented yet)"


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("flownp evaluate: not implemented yet")
