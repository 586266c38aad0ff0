"""What can go wrong talking to an upstream; the proxy turns each into the app's answer."""

from __future__ import annotations


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the connection or the protocol."""


class ConnectFailed(UpstreamError):
    """No connection could be made: the request was never sent."""


class ConnectTimeout(ConnectFailed, TimeoutError):
    """Connecting took longer than the connect timeout: the request was never sent."""


class PoolBusy(UpstreamError):
    """Every connection stayed busy for the pool's wait bound: the request was never sent."""


class StaleConnection(UpstreamError):
    """A reused connection closed before any byte of the answer: an idempotent request can
    be sent again on a new one."""
