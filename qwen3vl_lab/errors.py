"""One error type for everything a user can get wrong.

A `UserError` carries a one-line message that names the problem and the fix. The CLI prints it
as `qwen3vl-lab: error: <message>` and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse

PROG = "qwen3vl-lab"


class UserError(Exception):
    """Bad input: a missing file, an invalid value, a model folder of the wrong kind."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming the fix, exit code 2 (the CLI and `python -m` tools share it)."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")
