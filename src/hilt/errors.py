"""The one exception type for mistakes a user can make (bad file, bad flag, bad checkpoint). The CLI prints its
message as a single line and exits with ``exit_code``; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    exit_code = 2
