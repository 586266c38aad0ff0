"""A real authorization server for login tests: django-oauth-toolkit, from PyPI.

``start_dot(tmp)`` writes a tiny Django project (settings, URLs, a login page) into ``tmp``,
migrates its SQLite database, creates a user and a confidential client with PKCE required, and
serves it on 127.0.0.1 with a threaded WSGI server on a free port, which the child prints once
it listens (so nothing waits by sleeping). RFC 8414 metadata is served at the origin, so the
issuer is ``http://127.0.0.1:PORT``.

``Browser`` is what a person does in a browser: follow the authorization URL, fill in the
login form, press "Authorize", and land on the redirect URI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

CLIENT_ID, CLIENT_SECRET = "sidecar-client", "sidecar-client-secret-value"
USERNAME, PASSWORD = "tester", "tester-password-1"
REDIRECT_URIS = "http://127.0.0.1/callback http://127.0.0.1/oauth/callback"

SETTINGS = """
from pathlib import Path
BASE = Path(__file__).parent
SECRET_KEY = "test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
INSTALLED_APPS = [
    "django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
    "django.contrib.messages", "django.contrib.staticfiles", "oauth2_provider",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "dot_urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [BASE / "templates"], "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE / "db.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "/static/"
USE_TZ = True
LOGIN_URL = "/accounts/login/"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast; test only
OAUTH2_PROVIDER = {
    "PKCE_REQUIRED": True,
    "SCOPES": {"read": "Read the API"},
    "ALLOWED_REDIRECT_URI_SCHEMES": ["http", "https"],
    "ROTATE_REFRESH_TOKEN": True,
}
"""

URLS = """
from django.contrib.auth import views as auth_views
from django.urls import include, path
from oauth2_provider import urls as dot_urls

urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view(template_name="login.html")),
    path("", include((dot_urls.metadata_urlpatterns, "metadata"))),
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
]
"""

LOGIN = """<!doctype html><title>Sign in</title>
<form method="post">{% csrf_token %}{{ form.as_p }}
<input type="hidden" name="next" value="{{ next }}"><button type="submit">Sign in</button></form>
"""

SERVER = f"""
import os, socketserver, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["DJANGO_SETTINGS_MODULE"] = "dot_settings"
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.auth.models import User
from oauth2_provider.models import Application
User.objects.create_user({USERNAME!r}, password={PASSWORD!r})
Application.objects.create(
    name="sidecar", client_id={CLIENT_ID!r}, client_secret={CLIENT_SECRET!r},
    client_type="confidential", authorization_grant_type="authorization-code",
    redirect_uris={REDIRECT_URIS!r}, algorithm="",
)
from django.core.wsgi import get_wsgi_application
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

class Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

server = make_server("127.0.0.1", 0, get_wsgi_application(), Server, Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"""


@dataclass
class Dot:
    process: subprocess.Popen[str]
    issuer: str  # RFC 8414 metadata at /.well-known/oauth-authorization-server

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_dot(tmp: Path) -> Dot:
    """Start the server, or skip (fail under CI=true) saying why it cannot start."""
    try:
        import django  # noqa: F401
        import oauth2_provider  # noqa: F401
    except ImportError as exc:
        unavailable(f"django-oauth-toolkit is not installed ({exc}); pip install -e '.[test]'")
    (tmp / "templates").mkdir(parents=True, exist_ok=True)
    (tmp / "dot_settings.py").write_text(SETTINGS)
    (tmp / "dot_urls.py").write_text(URLS)
    (tmp / "templates" / "login.html").write_text(LOGIN)
    (tmp / "dot_server.py").write_text(SERVER)
    with open(tmp / "dot.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(tmp / "dot_server.py")],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    assert process.stdout is not None
    port = process.stdout.readline().strip()  # the child prints its port once it listens
    if not port.isdigit():
        process.kill()
        process.wait()
        process.stdout.close()
        unavailable(f"django-oauth-toolkit did not start: {(tmp / 'dot.log').read_text()[-2000:]}")
    return Dot(process, f"http://127.0.0.1:{port}")


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class _Forms(HTMLParser):
    """Every form's action and its input fields (submit buttons only when named)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")


def form_fields(html: str) -> dict[str, str]:
    parser = _Forms()
    parser.feed(html)
    assert parser.forms, f"no form in the page: {html[:500]}"
    return parser.forms[0][1]


class Browser:
    """Signs in and approves, as a person would; returns the redirect target's answer."""

    def __init__(self) -> None:
        # Cookies for an IP address host are refused by aiohttp's default jar.
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.session.close()

    async def sign_in(self, authorization_url: str, approve: bool = True) -> tuple[int, str, str]:
        """(status, page, final URL) after logging in and pressing Authorize (or Cancel)."""
        async with self.session.get(authorization_url) as resp:  # -> the login page
            login_url, page = str(resp.url), await resp.text()
        fields = form_fields(page) | {"username": USERNAME, "password": PASSWORD}
        async with self.session.post(login_url, data=fields) as resp:  # -> the consent page
            consent_url, page = str(resp.url), await resp.text()
        fields = form_fields(page)  # holds the Authorize button; Cancel is unnamed
        if not approve:
            del fields["allow"]
        async with self.session.post(consent_url, data=fields) as resp:  # -> the redirect URI
            return resp.status, await resp.text(), str(resp.url)

    async def get(self, url: str) -> tuple[int, str]:
        async with self.session.get(url) as resp:
            return resp.status, await resp.text()
