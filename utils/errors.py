"""Errors whose message says what to fix (a bad file, line and field; an output folder in the way; a checkpoint cut
off by a crash): the scripts print them as one line, `error: <message>`, and exit with status 1 instead of showing a
traceback. `--debug` on any script's command line shows the traceback as well. parse_config installs the hook, so
every script that reads its config has it."""
import sys
import traceback


class UserError(Exception):
    """Base of the errors that are the input's fault, not the code's. A `hint` attribute, if any, is printed after
    the message."""


def install_error_hook(debug=False):
    def hook(kind, error, trace):
        if debug or not issubclass(kind, UserError):
            traceback.print_exception(kind, error, trace)
        if issubclass(kind, UserError):
            print(f"error: {error}{getattr(error, 'hint', '')}", file=sys.stderr)
        # No sys.exit here: Python exits with status 1 after an uncaught exception anyway, and hooks that wrap this
        # one (torch.distributed prefixes each line with the rank) print what it wrote only once it returns.

    sys.excepthook = hook
