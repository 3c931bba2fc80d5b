"""The one exception a converter step raises for a record it must skip (never for a bug)."""


class BadRecord(ValueError):
    """A record that cannot be converted.

    `kind` is a stable short category (summed up in the report, used by tests); the message says
    what is wrong in words a user can act on.
    """

    def __init__(self, message: str, kind: str = "invalid_record"):
        super().__init__(message)
        self.kind = kind
