"""Where grants and the store meet: the current token of every account, kept fresh."""

from sidecar.credentials.manager import CredentialManager

__all__ = ["CredentialManager"]
