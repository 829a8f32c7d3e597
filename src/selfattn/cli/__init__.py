"""The command line: ``selfattn info | demo | explain | bench | train``, or ``python -m selfattn``;
the parser (:mod:`.parser`), one module per command, shared console helpers (:mod:`.console`).
Thin: bad arguments end with a one-line message and exit status 2."""

from .bench import cmd_bench
from .console import UsageError
from .demo import DEFAULT_TEXT, LESSON_X, cmd_demo
from .explain import cmd_explain
from .info import cmd_info
from .parser import build_parser, main
from .train import cmd_train

__all__ = [
    "DEFAULT_TEXT",
    "LESSON_X",
    "UsageError",
    "build_parser",
    "cmd_bench",
    "cmd_demo",
    "cmd_explain",
    "cmd_info",
    "cmd_train",
    "main",
]
