"""Placeholder until the bench sub-command lands."""


def add_parser(sub):
    p = sub.add_parser("bench", help="(not yet built)")
    p.set_defaults(fn=lambda args: (print("sparsecore bench: not built yet"), 1)[1])
