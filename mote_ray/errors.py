"""User-facing errors: the CLI prints their message (no traceback) and exits 2."""


class MoteError(Exception):
    """An error the user can fix; the message says what is wrong and what to do."""


class ModelNotFoundError(MoteError):
    pass


class UnsupportedModelError(MoteError):
    pass


class EngineUnavailableError(MoteError):
    pass
