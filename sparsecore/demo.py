"""Placeholder until the demo sub-command lands."""


def add_parser(sub):
    p = sub.add_parser("demo", help="(not yet built)")
    p.set_defaults(fn=lambda args: (print("sparsecore demo: not built yet"), 1)[1])
