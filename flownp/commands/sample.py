"""flownp sample (not implemented yet)."""

HELP = "sample (not implemented yet)"


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("flownp sample: not implemented yet")
