"""Service-level errors. Transports map `code` to their own status
(gRPC status code, HTTP status); nothing here imports a transport."""

from __future__ import annotations

import enum

# Most characters of client-supplied text an error message quotes.
ECHO_LIMIT = 64


def excerpt(text: str, limit: int = ECHO_LIMIT) -> str:
    """Client-supplied text as error messages quote it: at most `limit`
    characters, so an error never echoes a huge input back (a 100 KB model
    name would not fit in gRPC's trailing metadata; HTTP would return it whole)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text)} characters)"


# What a client is told of an unexpected failure (the details go to the log only).
INTERNAL_ERROR_MESSAGE = "internal error"


class ErrorCode(enum.Enum):
    """Named after the gRPC status codes the gRPC transport answers with."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"


class ServiceError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = ErrorCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        field = excerpt(field, 2 * ECHO_LIMIT)  # field paths may hold client-chosen keys
        super().__init__(f"{field}: {problem}")
        self.field = field


class ContextLengthExceeded(InvalidArgument):
    """The prompt does not fit the context window (OpenAI's
    context_length_exceeded, which clients key on)."""


class ModelNotFound(ServiceError):
    code = ErrorCode.NOT_FOUND


class Overloaded(ServiceError):
    code = ErrorCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class RateLimited(Overloaded):
    """This client sent more requests than its rate limit allows."""


class SlowConsumer(ServiceError):
    """The client fell too far behind reading its stream; its generation was
    ended to free the slot (not an overload: retrying will not help a client
    that does not read)."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServiceError):
    code = ErrorCode.UNAUTHENTICATED


class Unavailable(ServiceError):
    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = ErrorCode.DEADLINE_EXCEEDED


class InternalError(ServiceError):
    code = ErrorCode.INTERNAL
