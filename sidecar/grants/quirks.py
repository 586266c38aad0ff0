"""Provider quirks: the one place where a token endpoint's non-standard errors are read.

RFC 6749 §5.2 says an error answer is HTTP 400 (or 401 for ``invalid_client``) with a JSON
``error`` code from a fixed list. Providers depart from it in a few known ways. Each one is a
setting in ``[provider.quirks]`` (``config.ProviderQuirks``) and is handled here, by
``oauth_error``, and nowhere else:

- the code is in another field (``errorCode``) or nested (``{"error": {"code": ...}}``):
  ``error_field`` / ``error_description_field``, a dotted path, looked up exactly;
- the code is not a §5.2 code but means one, e.g. ``invalid_token`` or GitHub's
  ``bad_refresh_token`` for a dead refresh token: ``error_aliases`` maps it onto ours;
- errors come with another status, e.g. 403: ``error_statuses``;
- HTTP 200 whose body has an error code and no ``access_token`` (GitHub does this): always an
  error answer, since without an access token it cannot be a token.

``base.classify`` then decides fatal or transient by the standard code alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.config import ProviderQuirks

STANDARD = ProviderQuirks()


@dataclass(frozen=True)
class OAuthError:
    code: str  # in RFC 6749 terms, after error_aliases
    description: str
    sent: str  # the code as the provider sent it


def oauth_error(
    status: int, data: Mapping[str, Any] | None, quirks: ProviderQuirks = STANDARD
) -> OAuthError | None:
    """The OAuth error a token endpoint answer carries, or None when it carries none."""
    if data is None or (status != 200 and status not in quirks.error_statuses):
        return None
    if status == 200 and data.get("access_token") is not None:
        return None
    sent = _field(data, quirks.error_field)
    if not isinstance(sent, str) or not sent:
        return None
    description = _field(data, quirks.error_description_field)
    code = dict(quirks.error_aliases).get(sent, sent)
    return OAuthError(code, description if isinstance(description, str) else "", sent)


def _field(data: Mapping[str, Any], dotted: str) -> object:
    """The value at an exact dotted path; never a substring match."""
    value: object = data
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value
