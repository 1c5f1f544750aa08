"""The one exception type whose message is shown to users as a one-line error."""


class PipelineError(Exception):
    """A problem with the user's input or files; the message names it and says what to do."""
