"""flownp train (not implemented yet)."""

HELP = "train (not implemented yet)"


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("flownp train: not implemented yet")
