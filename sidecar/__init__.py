"""oauth-sidecar: a local proxy that injects OAuth2 bearer tokens and keeps them fresh."""

__version__ = "0.1.0"
