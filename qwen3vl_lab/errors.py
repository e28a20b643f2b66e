"""One error type for everything a user can get wrong.

A `UserError` carries a one-line message that names the problem and the fix. The CLI prints it
as `qwen3vl-lab: error: <message>` and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """Bad input: a missing file, an invalid value, a model folder of the wrong kind."""

    exit_code = 2
