"""The one exception type for user mistakes.

The CLI turns a `DfmError` into a one-line message and a non-zero exit; anything else is a
bug and keeps its traceback.
"""


class DfmError(ValueError):
    """A problem with the user's input (recipe, file, flag), with a message that says how to fix it."""
