"""One module per ``diffmem`` subcommand.

Each module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. ``diffmem.cli`` lists them in ``COMMANDS``; a module imports its heavy
dependencies inside ``run`` so that ``diffmem --help`` stays fast.
"""
