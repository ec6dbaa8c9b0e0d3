"""Service-level errors. Transports map `code` to their own status
(gRPC status code, HTTP status); nothing here imports a transport."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
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


class Unauthenticated(ServiceError):
    code = ErrorCode.UNAUTHENTICATED


class Unavailable(ServiceError):
    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = ErrorCode.DEADLINE_EXCEEDED


class InternalError(ServiceError):
    code = ErrorCode.INTERNAL
