"""Responses the sidecar makes itself: a JSON body and ``X-Sidecar-Error``.

The header lets an app tell the sidecar's own answers from the upstream's (a 401 from the
sidecar means "re-authorize this account", a 401 from the API means whatever the API says).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

ERROR_HEADER = "X-Sidecar-Error"


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **details: object,
) -> web.Response:
    text = error_body(code, message, **details).decode()
    response = web.Response(status=status, text=text, content_type="application/json")
    response.headers[ERROR_HEADER] = code
    if headers:
        response.headers.update(headers)
    return response


def error_body(code: str, message: str, **details: object) -> bytes:
    return json.dumps({"error": code, "message": message, **details}).encode()
