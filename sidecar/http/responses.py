"""Answers the sidecar makes itself: JSON, and ``X-Sidecar-Error`` on errors.

The header lets an app tell the sidecar's own answers from the upstream's (a 401 from the
sidecar means "re-authorize this account", a 401 from the API means whatever the API says).
"""

from __future__ import annotations

import json

from sidecar.http.messages import Headers, Response

ERROR_HEADER = "X-Sidecar-Error"
JSON = (b"Content-Type", b"application/json")


def json_response(data: object, status: int = 200, headers: Headers | None = None) -> Response:
    return Response(status, [JSON, *(headers or ())], json.dumps(data).encode())


def error_response(
    status: int, code: str, message: str, headers: Headers | None = None, **details: object
) -> Response:
    """An error made by the sidecar itself, marked with ``X-Sidecar-Error: <code>``."""
    marked: Headers = [(ERROR_HEADER.encode("ascii"), code.encode("ascii")), *(headers or ())]
    return json_response({"error": code, "message": message, **details}, status, marked)
