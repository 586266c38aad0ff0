"""The sidecar's exception tree.

::

    SidecarError
     +-- ConfigError                 bad configuration; carries every problem found
     +-- ListenError                 a listener cannot take its address (in use, not ours)
     +-- StoreError                  the token store failed (I/O, schema, lost update)
     |    +-- DecryptError           a stored row does not decrypt with any configured key
     |    +-- StoreUnreachable       cannot connect to the store at all (worth retrying at start)
     +-- GrantError                  the token endpoint did not give us a token
     |    +-- FatalGrantError        the grant is dead (invalid_grant, invalid_client, ...):
     |    |                          mark the account, never retry by ourselves
     |    +-- TransientGrantError    timeout, network, 5xx, 429, garbage answer: back off, retry
     +-- CredentialError             a request cannot get a token right now
          +-- UnknownAccount         no such account for this provider
          +-- ReauthorizationRequired  the account's grant is dead until an operator acts
          +-- TokenUnavailable       no valid token and refreshing (or the store) failed
          |                          transiently
          +-- TokenUndecryptable     the stored pair does not decrypt with the configured keys

``CredentialError`` subclasses carry the ``code`` the proxy puts in ``X-Sidecar-Error``.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """Configuration problems, each a ``"key.path: message"`` string."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class ListenError(SidecarError):
    """A listener cannot bind its address. Fatal at start: one line for the operator."""

    def __init__(self, listener: str, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} for the {listener} listener: {reason}")


class StoreError(SidecarError):
    """The token store could not do what was asked."""


class DecryptError(StoreError):
    """A stored row does not decrypt: wrong key, tampered data, or copied to another account."""


class StoreUnreachable(StoreError):
    """No connection to the store could be made: at start this may pass (a database pod
    starting beside ours), unlike a schema or permission problem."""


class GrantError(SidecarError):
    """The token endpoint did not give us a usable token."""


class FatalGrantError(GrantError):
    """The provider rejected the grant or the client (RFC 6749 §5.2); retrying cannot help."""

    def __init__(self, error: str, description: str = "") -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description


class TransientGrantError(GrantError):
    """The token endpoint failed in a way that may pass.

    ``outcome_unknown`` is true when the request may have reached the provider but the answer
    was lost: the provider may already have rotated the refresh token.
    ``retry_after`` is the provider's ``Retry-After`` in seconds, when it sent one.
    ``lost_cause`` names why an answer was lost (``timeout``, ``connection_lost``): a metric
    label, so a small fixed set.
    """

    def __init__(
        self,
        reason: str,
        *,
        outcome_unknown: bool = False,
        retry_after: float | None = None,
        lost_cause: str = "connection_lost",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome_unknown = outcome_unknown
        self.retry_after = retry_after
        self.lost_cause = lost_cause


class CredentialError(SidecarError):
    """A request cannot be given a token; ``code`` names why for the app."""

    code = "credential_error"
    status = 500


class UnknownAccount(CredentialError):
    code = "unknown_account"
    status = 404


class ReauthorizationRequired(CredentialError):
    code = "reauthorization_required"
    status = 401

    def __init__(self, reason: str, since: float | None) -> None:
        super().__init__(f"account needs re-authorization: {reason}")
        self.reason = reason
        self.since = since


class TokenUnavailable(CredentialError):
    code = "token_unavailable"
    status = 503

    def __init__(
        self,
        retry_after: int,
        message: str = "no valid access token; refreshing failed, will retry",
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TokenUndecryptable(CredentialError):
    """A configuration fault, not a bug: the key that sealed the row is not configured."""

    code = "token_undecryptable"
    status = 503
