"""Domain errors, raised where they arise and mapped to HTTP in one place (``api/errors.py``)."""

from __future__ import annotations


class SD3ServeError(Exception):
    """Base of every error the API turns into a response."""


class InvalidRequest(SD3ServeError):
    """The request is malformed or a field is out of its allowed range (400)."""


class InvalidApiKey(SD3ServeError):
    """The ``x-api-key`` header is missing, unknown or revoked (401)."""


class NotFound(SD3ServeError):
    """Unknown path, model slug, key id or task (404)."""


class InsufficientCredits(SD3ServeError):
    """The key's balance is below the request's cost (406)."""

    def __init__(self, balance: float, cost: float) -> None:
        super().__init__(f"not enough credits: this request costs {cost:g}, the balance is {balance:g}")
        self.balance = balance
        self.cost = cost


class RateLimited(SD3ServeError):
    """The key's requests per minute are used up (429)."""

    def __init__(self, limit: int, reset_at: float) -> None:
        super().__init__(f"rate limit of {limit} requests per minute reached for this key")
        self.reset_at = reset_at


class Forbidden(SD3ServeError):
    """A wrong admin key (403)."""


class DatabaseUnavailable(SD3ServeError):
    """The credit database cannot be reached (503); nothing is charged."""


class PayloadTooLarge(SD3ServeError):
    """The request body is over the configured limit (413)."""


class Overloaded(SD3ServeError):
    """The queue is full (503)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueTimeout(Overloaded):
    """A request waited in the queue past its deadline (503); nothing is charged."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=5)


class ReservationLost(SD3ServeError):
    """The request's credit hold is gone before its images were delivered (503): another process declared this
    one dead and returned the hold, or the task was settled elsewhere. Nothing is delivered, nothing charged."""


class IdempotencyConflict(SD3ServeError):
    """An ``Idempotency-Key`` reused with another request body (422)."""


class IdempotencyInProgress(SD3ServeError):
    """The first request with this ``Idempotency-Key`` is still running (409, Retry-After)."""


class StorageFull(SD3ServeError):
    """Stored results are at their budget: the key's (429) or the server's (503, Retry-After)."""

    def __init__(self, message: str, *, server_wide: bool) -> None:
        super().__init__(message)
        self.server_wide = server_wide


class TooManyStreams(SD3ServeError):
    """The key holds as many open streams (event streams, base64 result downloads) as it may (429, Retry-After)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationFailed(SD3ServeError):
    """The engine raised while generating (500); nothing is charged."""
