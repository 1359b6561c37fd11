"""The one exception type users see: a refused input or a failed check.

The CLI prints `sdkit: error: <message>` for it and exits 1; everything else is a bug
and shows a traceback only with --debug.
"""


class SdkitError(Exception):
    """A problem with the user's input or environment, described in one line."""
