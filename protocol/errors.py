"""The catalogue of protocol-level errors a technician may see."""


class CodedError(Exception):
    """A refusal or failure with a stable code (``reason``) for programs beside its message.

    The code is what events and MQTT replies carry (protocol/catalogue.py); the message
    is for people and logs.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProtocolError(Exception):
    """Base for every error raised while interpreting data from the field bus."""


class RegisterBlockError(ProtocolError):
    """A register block has the wrong length or holds values outside the map's ranges.

    Raised instead of returning half-decoded data: a status that cannot be trusted
    must be marked stale by the caller, never published as fresh.
    """


class UnknownMapVersionError(RegisterBlockError):
    """A board reports a register-map version this software does not know how to drive."""
