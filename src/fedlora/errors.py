"""The one base class of every error a user can cause (a bad file, field, client or update).

Each subclass's message names the file, record, field, client or module at fault; the CLI
prints it as one line, never a traceback.
"""


class FedloraError(ValueError):
    """A mistake in what the user gave fedlora, described in one line."""
