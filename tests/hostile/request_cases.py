"""Request-side cases: what a hostile app writes, and every outcome that is correct for it.

Each case is raw bytes (``{silent}`` stands for the second target's host:port) and a set of
acceptable outcomes. An outcome is the exact list of requests the target receives (method,
path, body, account), each answered to the app with its own answer in order, then possibly
one sidecar error. Where RFC 9112 leaves a choice (reject, or repair and forward one
request), both are listed; a smuggled second request never is. The generators below build
the tables; ``test_request_side.py`` runs them and ``test_nginx_differential.py`` compares
them with nginx.

Sources: RFC 9112 §2.2 (bare CR/LF), §3 (request line, Host), §5 (field syntax, obs-fold),
§6.1 and §6.3 (Transfer-Encoding, Content-Length, HTTP/1.0), §7.1 (chunks), §11.2 (smuggling);
RFC 9110 §5.5 (field values), §7.6.1 (hop-by-hop), §9.3.8 (TRACE); the issue's findings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.hostile.app import AppResult
from tests.hostile.harness import FORGED, PROBE_TRAILER, SILENT, Rig, error_problem, probe_problem
from tests.hostile.target import UpRequest, answer_body

BAD = (400, "bad_request")
TOO_LARGE = (431, "headers_too_large")
INVALID_PATH = (400, "invalid_path")
ACCOUNT = (400, "invalid_account_header")
NOT_ALLOWED = (405, "method_not_allowed")
UNKNOWN_ACCOUNT = (404, "unknown_account")

HOST = b"Host: app.test\r\n"
SMUGGLE = b"GET /SMUGGLED HTTP/1.1\r\nHost: app.test\r\n\r\n"
AFTER = b"GET /after HTTP/1.1\r\nHost: app.test\r\n\r\n"
HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"


@dataclass(frozen=True)
class Fwd:
    """A request the target receives (path with ``{silent}`` filled in)."""

    method: bytes
    path: bytes
    body: bytes = b""
    account: str = "main"


@dataclass(frozen=True)
class Outcome:
    forwarded: tuple[Fwd, ...] = ()
    errors: frozenset[tuple[int, str]] = frozenset()  # then one of these sidecar answers

    @property
    def frames(self) -> int:
        return len(self.forwarded) + (1 if self.errors else 0)

    def describe(self) -> str:
        parts = [f"{f.method.decode()} {f.path.decode('latin-1')}" for f in self.forwarded]
        if self.errors:
            parts.append("|".join(f"{s} {c}" for s, c in sorted(self.errors)))
        return " then ".join(parts) or "nothing"


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    outcomes: tuple[Outcome, ...]
    reply: str = "answer"  # the target's script: "answer", or "reflect" (echo all but GET)
    upstream: tuple[tuple[str, Any], ...] = ()  # [[upstream]] keys
    note: str = ""

    @property
    def refused(self) -> bool:
        """Every correct outcome refuses without reaching the target."""
        return all(not o.forwarded for o in self.outcomes)

    @property
    def frames(self) -> int:
        return max(o.frames for o in self.outcomes)


def refuse(*codes: tuple[int, str]) -> Outcome:
    return Outcome((), frozenset(codes or (BAD,)))


def forward(*fwds: Fwd, then: tuple[tuple[int, str], ...] = ()) -> Outcome:
    return Outcome(tuple(fwds), frozenset(then))


def get(path: bytes = b"/x", account: str = "main") -> Fwd:
    return Fwd(b"GET", path, b"", account)


def post(body: bytes = b"hello", path: bytes = b"/x", account: str = "main") -> Fwd:
    return Fwd(b"POST", path, body, account)


def numbered(prefix: str, items: list[tuple[bytes, tuple[Outcome, ...], str]]) -> Iterator[Case]:
    for n, (data, outcomes, note) in enumerate(items, 1):
        yield Case(f"{prefix}-{n:02d}", data, outcomes, note=note)


def _post(fields: bytes, body: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /x " + version + b"\r\n" + HOST + fields + b"\r\n" + body


# ---------------------------------------------------------------------------------------------
# Framing: Content-Length and Transfer-Encoding

TE_SPELLINGS = [b"chunked", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"\tchunked"]


def clte_cases() -> Iterator[Case]:
    """Both framings at once (RFC 9112 §6.3 item 3): refused, whatever the order or values."""
    items = []
    for te in TE_SPELLINGS:
        for cl in (b"5", b"0", b"40"):
            for order in ("cl-te", "te-cl"):
                fields = [b"Content-Length: " + cl + b"\r\n", b"Transfer-Encoding:" + te + b"\r\n"]
                if order == "te-cl":
                    fields.reverse()
                data = _post(b"".join(fields), HELLO_CHUNKED + SMUGGLE)
                items.append((data, (refuse(BAD),), f"CL {cl!r} + TE {te!r}, {order}"))
    return numbered("request-clte", items)


def content_length_cases() -> Iterator[Case]:
    items = []
    invalid = [b"+5", b"-5", b"0x5", b"5.0", b"5 5", b"", b" ", b"5a", b"a5", b"1e1"]
    invalid += [b"99999999999999999999999", b"5\x00", b"\xd9\xa5", b"5,", b",5", b"5;"]
    for value in invalid:
        data = _post(b"Content-Length: " + value + b"\r\n", b"hello" + SMUGGLE)
        items.append((data, (refuse(BAD),), f"invalid Content-Length {value!r}"))
    for values in (
        [b"5", b"6"],
        [b"6", b"5"],
        [b"5", b"0"],
        [b"0", b"5"],
        [b"5, 6"],
        [b"5", b"5, 6"],
    ):
        fields = b"".join(b"Content-Length: " + v + b"\r\n" for v in values)
        data = _post(fields, b"hello" + SMUGGLE)
        items.append((data, (refuse(BAD),), f"differing Content-Length {values!r}"))
    for values in ([b"5", b"5"], [b"5, 5"], [b"5,5"], [b"5", b"05"]):
        # RFC 9110 §8.6: a recipient MAY take identical values as one; refusing is fine too.
        fields = b"".join(b"Content-Length: " + v + b"\r\n" for v in values)
        data = _post(fields, b"hello")
        items.append((data, (refuse(BAD), forward(post())), f"repeated Content-Length {values!r}"))
    for value in (b"05", b"005", b"5 ", b" 5", b"\t5"):
        data = _post(b"Content-Length:" + value + b"\r\n", b"hello" + AFTER)
        items.append((data, (forward(post(), get(b"/after")),), f"valid Content-Length {value!r}"))
    return numbered("request-cl", items)


def transfer_encoding_cases() -> Iterator[Case]:
    """Obfuscated Transfer-Encoding (RFC 9112 §6.1): anything but a final, single chunked
    is refused before a byte goes upstream; OWS and case are not obfuscation."""
    items = []
    invalid = [
        b"xchunked",
        b"chunkedx",
        b"chunked, identity",
        b"chunked, gzip",
        b"chunked, chunked",
        b"chunk",
        b"chunked;q=1",
        b'"chunked"',
        b"chunked\x0b",
        b"\x0bchunked",
        b"chunked\x00",
        b"chunked\x0c",
        b"ch unked",
        b"identity",
        b"gzip",
        b"",
    ]
    for value in invalid:
        data = _post(b"Transfer-Encoding: " + value + b"\r\n", HELLO_CHUNKED + SMUGGLE)
        items.append((data, (refuse(BAD),), f"Transfer-Encoding {value!r}"))
    # A coding the sidecar cannot apply, before chunked: the body after de-chunking is still
    # gzip-coded, so forwarding it without that coding changes what the target reads (RFC 9112
    # §6.1: 501 or 400). The request after it is only pipelined, not smuggled: no marker.
    for values in ([b"gzip, chunked"], [b"deflate, chunked"], [b"gzip", b"chunked"]):
        fields = b"".join(b"Transfer-Encoding: " + v + b"\r\n" for v in values)
        data = _post(fields, HELLO_CHUNKED + AFTER)
        items.append((data, (refuse(BAD),), f"unsupported coding before chunked {values!r}"))
    # "identity" was the no-op coding (removed in RFC 7230): refusing or ignoring it are safe.
    for values in ([b"identity, chunked"], [b"identity", b"chunked"]):
        fields = b"".join(b"Transfer-Encoding: " + v + b"\r\n" for v in values)
        data = _post(fields, HELLO_CHUNKED + AFTER)
        outcomes = (refuse(BAD), forward(post(), get(b"/after")))
        items.append((data, outcomes, f"identity before chunked {values!r}"))
    for value in (b"chunked,", b",chunked", b"chunked, "):
        # RFC 9110 §5.6.1: empty list elements are allowed; refusing them is also safe.
        data = _post(b"Transfer-Encoding: " + value + b"\r\n", HELLO_CHUNKED)
        items.append((data, (refuse(BAD), forward(post())), f"list with empty element {value!r}"))
    for value in TE_SPELLINGS[1:]:
        data = _post(b"Transfer-Encoding:" + value + b"\r\n", HELLO_CHUNKED + AFTER)
        items.append((data, (forward(post(), get(b"/after")),), f"valid spelling {value!r}"))
    # Trailing HTAB is OWS too, but nginx refuses it as well: refusing is tolerated.
    data = _post(b"Transfer-Encoding: chunked\t\r\n", HELLO_CHUNKED + AFTER)
    outcomes = (forward(post(), get(b"/after")), refuse(BAD))
    items.append((data, outcomes, "valid spelling, trailing HTAB"))
    for values in ([b"chunked", b"chunked"], [b"chunked", b"identity"], [b"chunked", b"gzip"]):
        fields = b"".join(b"Transfer-Encoding: " + v + b"\r\n" for v in values)
        data = _post(fields, HELLO_CHUNKED + SMUGGLE)
        items.append((data, (refuse(BAD),), f"Transfer-Encoding fields {values!r}"))
    for field_line in (
        b"Transfer-Encoding : chunked",
        b"Transfer-Encoding\t: chunked",
        b"Transfer-Encoding\x00: chunked",
        b"Transfer-Encoding:\x0bchunked",
    ):
        data = _post(field_line + b"\r\n", HELLO_CHUNKED + SMUGGLE)
        items.append((data, (refuse(BAD),), f"field line {field_line!r}"))
    # A different field name: no framing, so the body bytes are the next "request" (invalid).
    data = _post(b"Transfer_Encoding: chunked\r\n", HELLO_CHUNKED)
    items.append((data, (forward(post(b""), then=(BAD,)), refuse(BAD)), "Transfer_Encoding"))
    # Whitespace before the first field line (RFC 9112 §2.2): reject, or ignore that line.
    data = b"POST /x HTTP/1.1\r\n Transfer-Encoding: chunked\r\n" + HOST + b"\r\n" + HELLO_CHUNKED
    items.append((data, (refuse(BAD), forward(post(b""), then=(BAD,))), "indented first field"))
    return numbered("request-te", items)


def chunk_cases() -> Iterator[Case]:
    """Malformed chunked bodies (RFC 9112 §7.1): 400 ``bad_request``, nothing forwarded."""
    bad: list[tuple[str, bytes]] = []
    for size in (b"zz", b"-5", b"+5", b"0x5", b" 5", b"fffffffffffffffff", b"10000000000000000"):
        bad.append(("size", size + b"\r\nhello\r\n0\r\n\r\n"))
    for size in (b"", b"5\x00", b"\xff5", b"5g", b"g", b"5\r"):
        bad.append(("size", size + b"\r\nhello\r\n0\r\n\r\n"))
    bad.append(("size", b"5\rhello\r\n0\r\n\r\n"))
    for data in (
        b"5\r\nhelloXX0\r\n\r\n",
        b"5\r\nhello\r0\r\n\r\n",
        b"5\r\nhellohello\r\n0\r\n\r\n",
        b"5\r\nhel\r\n0\r\n\r\n",
        b"3\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello0\r\n\r\n",
    ):
        bad.append(("data", data))
    for ext in (
        b";",
        b';a="unterminated',
        b";a=b c",
        b";a=\x01",
        b";a=\x00",
        b";a\rb",
        b';a="x\ny"',
        b";a=b\x7f",
    ):
        bad.append(("ext", b"5" + ext + b"\r\nhello\r\n0\r\n\r\n"))
    for trailer in (
        b"bad trailer\r\n",
        b"X: \x00\r\n",
        b"X : y\r\n",
        b": y\r\n",
        b"X: y\r\r\n",
        b"X\x00: y\r\n",
        b"GET /SMUGGLED HTTP/1.1\r\nHost: app.test\r\n",
    ):
        bad.append(("trailer", b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n"))
    head = b"POST /x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
    counters: dict[str, int] = {}
    for kind, body in bad:
        counters[kind] = counters.get(kind, 0) + 1
        tail = b"" if SMUGGLE in body or b"SMUGGLED" in body else SMUGGLE
        yield Case(
            f"request-chunk-bad-{kind}-{counters[kind]:02d}",
            head + body + tail,
            (refuse(BAD),),
            note=f"malformed chunked body {body[:40]!r}",
        )
    # Lenient readings RFC 9112 allows (BWS in extensions, a bare LF line end): refuse, or
    # forward the one body they mean.
    either = [
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\n0\r\n\r\n",
        b"5; a=b\r\nhello\r\n0\r\n\r\n",
        b"5 ;a=b\r\nhello\r\n0\r\n\r\n",
        b'5;a="b;c"\r\nhello\r\n0\r\n\r\n',
        b"5\r\nhello\r\n0\r\n X: folded\r\n\r\n",
        b"5\r\nhello\r\n0\r\nX: y\n\r\n",
    ]
    for n, body in enumerate(either, 1):
        yield Case(f"request-chunk-lenient-{n:02d}", head + body, (refuse(BAD), forward(post())))
    # llhttp accepts an empty chunk-extension name (";=x"), which RFC 9112 §7.1.1 does not
    # allow. It is skipped like any extension, so the framing stays unambiguous: refusing it
    # and forwarding the de-chunked body are both safe, and no parser reads it otherwise.
    empty_ext = head + b"5;=x\r\nhello\r\n0\r\n\r\n"
    yield Case("request-chunk-empty-ext-name", empty_ext, (refuse(BAD), forward(post())))
    huge_ext = b"5;" + b"a" * 70_000 + b"\r\nhello\r\n0\r\n\r\n"
    huge_trailer = b"5\r\nhello\r\n0\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"
    many_trailers = b"5\r\nhello\r\n0\r\n" + b"X-T: v\r\n" * 200 + b"\r\n"
    for n, body in enumerate((huge_ext, huge_trailer, many_trailers), 1):
        yield Case(
            f"request-chunk-huge-{n:02d}",
            head + body,
            (refuse(BAD), refuse(TOO_LARGE), forward(post())),
            note="bounded: refuse, or read within the limits and forward",
        )
    valid = [
        (b"0005\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5\r\nhello\r\n00\r\n\r\n", b"hello"),
        (b"A\r\nhellohello\r\n0\r\n\r\n", b"hellohello"),
        (b"a\r\nhellohello\r\n0\r\n\r\n", b"hellohello"),
        (b"5;a=b\r\nhello\r\n0;c\r\n\r\n", b"hello"),
        (b"2\r\nhe\r\n3\r\nllo\r\n0\r\nX-Trailer: ok\r\n\r\n", b"hello"),
        (b"0\r\n\r\n", b""),
    ]
    for n, (body, decoded) in enumerate(valid, 1):
        yield Case(
            f"request-chunk-valid-{n:02d}",
            head + body + AFTER,
            (forward(post(decoded), get(b"/after")),),
        )


def http10_cases() -> Iterator[Case]:
    """Transfer-Encoding in HTTP/1.0 (RFC 9112 §6.1): faulty framing, refused."""
    items = []
    variants = [
        (b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLE),
        (b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLE),
        (b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n", HELLO_CHUNKED + SMUGGLE),
        (b"Connection: keep-alive\r\nTransfer-Encoding: Chunked\r\n", b"0\r\n\r\n" + SMUGGLE),
        (
            b"Connection: keep-alive\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            b"0\r\n\r\n" + SMUGGLE,
        ),
    ]
    for fields, body in variants:
        data = b"POST / HTTP/1.0\r\n" + HOST + fields + b"\r\n" + body
        items.append((data, (refuse(BAD),), "HTTP/1.0 with Transfer-Encoding"))
    data = (
        b"GET / HTTP/1.0\r\n"
        + HOST
        + b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        + SMUGGLE
    )
    items.append((data, (refuse(BAD),), "HTTP/1.0 GET with Transfer-Encoding"))
    return numbered("request-http10-te", items)


# ---------------------------------------------------------------------------------------------
# Lines and fields


def line_ending_cases() -> Iterator[Case]:
    """Bare CR and bare LF (RFC 9112 §2.2): a bare CR is invalid (or replaced by SP); a bare LF
    may be taken as a line end. Either way one request at most, and no bare CR/LF upstream."""
    one = (refuse(BAD), forward(get()))
    items = [
        (b"GET /x HTTP/1.1\n" + b"Host: app.test\n\n", one, "LF-only lines"),
        (b"GET /x HTTP/1.1\r\nHost: app.test\n\r\n", one, "LF ending a field"),
        (b"GET /x HTTP/1.1\r\n" + HOST + b"X: a\rb\r\n\r\n", one, "bare CR in a value"),
        (b"GET /x HTTP/1.1\r" + HOST + b"\r\n", (refuse(BAD),), "bare CR after the request line"),
        (b"GET /x HTTP/1.1\r\n" + HOST + b"X: a\r\r\n\r\n", one, "CR CR LF"),
        (b"GET /x HTTP/1.1\r\n" + HOST + b"\r\r\n", one, "CR CR LF ending the head"),
        (b"GET /x\rHTTP/1.1\r\n" + HOST + b"\r\n", (refuse(BAD),), "bare CR in the request line"),
        (
            b"GET /x HTTP/1.1\r\n" + HOST + b"X: a\nContent-Length: 5\r\n\r\nhello",
            (refuse(BAD), forward(Fwd(b"GET", b"/x", b"hello"))),
            "LF inside a value hiding a Content-Length",
        ),
        (
            b"POST /x HTTP/1.1\r\n" + HOST + b"Content-Length: 5\n\r\nhello",
            (refuse(BAD), forward(post())),
            "LF after Content-Length",
        ),
        (
            b"GET /x HTTP/1.1\r\n"
            + HOST
            + b"X: a\r\nTransfer-Encoding: chunked\r\r\n\r\n0\r\n\r\n",
            (refuse(BAD), forward(get())),
            "CR CR LF after Transfer-Encoding",
        ),
    ]
    return numbered("request-crlf", items)


def obs_fold_cases() -> Iterator[Case]:
    """obs-fold (RFC 9112 §5.2): rejected with 400, or replaced by SP; never forwarded."""
    one = (refuse(BAD), forward(get()))
    items = [
        (b"GET /x HTTP/1.1\r\n" + HOST + b"X-A: a\r\n b\r\n\r\n", one, "fold with SP"),
        (b"GET /x HTTP/1.1\r\n" + HOST + b"X-A: a\r\n\tb\r\n\r\n", one, "fold with HTAB"),
        (b"GET /x HTTP/1.1\r\n" + HOST + b"X-A:\r\n b\r\n\r\n", one, "empty value, folded"),
        (b"GET /x HTTP/1.1\r\nHost: app\r\n .test\r\n\r\n", one, "folded Host"),
        (
            _post(b"Transfer-Encoding:\r\n chunked\r\n", HELLO_CHUNKED),
            (refuse(BAD), forward(post())),
            "folded Transfer-Encoding",
        ),
        (
            _post(b"Content-Length:\r\n 5\r\n", b"hello"),
            (refuse(BAD), forward(post())),
            "folded Content-Length",
        ),
        (
            b"GET /x HTTP/1.1\r\n" + HOST + b"X-Sidecar-Account: main\r\n other\r\n\r\n",
            (refuse(BAD, ACCOUNT, UNKNOWN_ACCOUNT),),
            "folded account header",
        ),
        (
            b"GET /x HTTP/1.1\r\n" + HOST + b"X-Sidecar-Account: other\r\n \r\n\r\n",
            (refuse(BAD, ACCOUNT), forward(get(account="other"))),
            "account header with an empty fold",
        ),
        (
            _post(b"Content-Length: 5\r\n \r\n", b"hello"),
            (refuse(BAD), forward(post())),
            "empty fold after Content-Length",
        ),
    ]
    return numbered("request-fold", items)


CONTROLS = [0x00, 0x01, 0x07, 0x08, 0x0B, 0x0C, 0x1B, 0x1F, 0x7F]


def control_char_cases() -> Iterator[Case]:
    """NUL and other controls: refused in names and targets; in values NUL is refused
    (RFC 9110 §5.5), other controls are refused or forwarded as they are."""
    for c in CONTROLS:
        char = bytes([c])
        yield Case(
            f"request-ctl-name-{c:02x}",
            b"GET /x HTTP/1.1\r\n" + HOST + b"X-A" + char + b"B: v\r\n\r\n",
            (refuse(BAD),),
        )
        value_outcomes = (refuse(BAD),) if c == 0 else (refuse(BAD), forward(get()))
        yield Case(
            f"request-ctl-value-{c:02x}",
            b"GET /x HTTP/1.1\r\n" + HOST + b"X-A: a" + char + b"b\r\n\r\n",
            value_outcomes,
        )
        yield Case(
            f"request-ctl-target-{c:02x}",
            b"GET /a" + char + b"b HTTP/1.1\r\n" + HOST + b"\r\n",
            (refuse(BAD, INVALID_PATH),),
        )
    yield Case(
        "request-ctl-obs-text-value",
        b"GET /x HTTP/1.1\r\n" + HOST + b"X-A: caf\xc3\xa9\r\n\r\n",
        (forward(get()),),
        note="obs-text is allowed in values",
    )
    yield Case(
        "request-ctl-obs-text-name",
        b"GET /x HTTP/1.1\r\n" + HOST + b"X-\xc3\xa9: v\r\n\r\n",
        (refuse(BAD),),
    )


def header_name_cases() -> Iterator[Case]:
    """Field names that are not tokens (RFC 9110 §5.1), space before the colon (§5.1 of 9112)."""
    names = [b"X Y", b"X\tY", b"(x)", b"x@y", b'x"y', b"x/y", b"[x]", b"x{y}", b"", b"x\\y"]
    names += [b"x,y", b"x;y", b"x=y", b"x?y", b"x<y>", b"Host ", b"Content-Length "]
    for n, name in enumerate(names, 1):
        value = b"5" if name.startswith(b"Content-Length") else b"v"
        body = b"hello" + SMUGGLE if name.startswith(b"Content-Length") else b""
        yield Case(
            f"request-name-{n:02d}",
            b"POST /x HTTP/1.1\r\n" + HOST + name + b": " + value + b"\r\n\r\n" + body,
            (refuse(BAD),),
            note=f"field name {name!r}",
        )


def request_line_cases() -> Iterator[Case]:
    def line(request_line: bytes, extra: bytes = b"") -> bytes:
        return request_line + b"\r\n" + HOST + extra + b"\r\n"

    silent = SILENT
    items: list[tuple[bytes, tuple[Outcome, ...], str]] = [
        # absolute-form to another host: only the path goes, and only to the target
        (line(b"GET http://" + silent + b"/abs HTTP/1.1"), (forward(get(b"/abs")),), "abs"),
        (line(b"GET HTTP://" + silent + b"/abs HTTP/1.1"), (forward(get(b"/abs")),), "ABS"),
        (
            line(b"GET http://u:p@" + silent + b"/abs HTTP/1.1"),
            (forward(get(b"/abs")), refuse(BAD, INVALID_PATH)),
            "userinfo",
        ),
        (line(b"GET http://" + silent + b"/a?q=1 HTTP/1.1"), (forward(get(b"/a?q=1")),), "q"),
        (line(b"GET http://" + silent + b" HTTP/1.1"), (forward(get(b"/")),), "no path"),
        (line(b"GET https://" + silent + b"/abs HTTP/1.1"), (forward(get(b"/abs")),), "https"),
        (
            line(b"GET ftp://" + silent + b"/abs HTTP/1.1"),
            (forward(get(b"/abs")), refuse(BAD, INVALID_PATH)),
            "ftp scheme",
        ),
        (
            line(b"GET //" + silent + b"/abs HTTP/1.1"),
            (forward(get(b"//" + silent + b"/abs")), refuse(BAD, INVALID_PATH)),
            "network-path reference",
        ),
        (line(b"GET /a/../../etc HTTP/1.1"), (forward(get(b"/etc")),), "dot segments"),
        (line(b"GET * HTTP/1.1"), (refuse(BAD, INVALID_PATH),), "asterisk-form on GET"),
        (line(b"GET " + silent + b" HTTP/1.1"), (refuse(BAD, INVALID_PATH),), "authority-form"),
        (
            line(b"OPTIONS * HTTP/1.1"),
            (refuse(BAD, INVALID_PATH), forward(Fwd(b"OPTIONS", b"*"))),
            "OPTIONS *",
        ),
        (line(b"GET x HTTP/1.1"), (refuse(BAD, INVALID_PATH),), "relative target"),
        # versions
        (line(b"GET /x HTTP/1.2"), (refuse(BAD), forward(get())), "HTTP/1.2"),
        *[
            (line(b"GET /x " + v), (refuse(BAD),), f"version {v!r}")
            for v in (
                b"HTTP/2.0",
                b"HTTP/3.0",
                b"HTTP/0.9",
                b"HTTP/1.10",
                b"HTTP/11",
                b"http/1.1",
                b"HTTP/1.1x",
                b"HTTP/1",
                b"HTTP /1.1",
                b"HTTP/1.1/",
                b"HTTP/1.a",
            )
        ],
        (b"GET /x\r\n" + HOST + b"\r\n", (refuse(BAD),), "HTTP/0.9 simple request"),
        # spaces
        (line(b"GET  /x HTTP/1.1"), (refuse(BAD), forward(get())), "two spaces"),
        (line(b"GET /x  HTTP/1.1"), (refuse(BAD), forward(get())), "two spaces before version"),
        (line(b"GET /x HTTP/1.1 "), (refuse(BAD),), "trailing space"),
        (line(b" GET /x HTTP/1.1"), (refuse(BAD),), "leading space"),
        (line(b"GET\t/x\tHTTP/1.1"), (refuse(BAD), forward(get())), "tabs"),
        (line(b"GET /a b HTTP/1.1"), (refuse(BAD),), "space in the target"),
        (b"\r\n" + line(b"GET /x HTTP/1.1"), (forward(get()),), "empty line first"),
        # methods
        (line(b"FOO /x HTTP/1.1"), (refuse(BAD), forward(Fwd(b"FOO", b"/x"))), "unknown"),
        (line(b"get /x HTTP/1.1"), (refuse(BAD), forward(Fwd(b"get", b"/x"))), "lowercase"),
        (line(b"G\x00T /x HTTP/1.1"), (refuse(BAD),), "NUL in the method"),
        (line(b"GET\x00 /x HTTP/1.1"), (refuse(BAD),), "NUL after the method"),
        (line(b"G(T /x HTTP/1.1"), (refuse(BAD),), "non-token method"),
        (
            line(b"A" * 100 + b" /x HTTP/1.1"),
            (refuse(BAD), forward(Fwd(b"A" * 100, b"/x"))),
            "long method",
        ),
        (line(b"A" * 70_000 + b" /x HTTP/1.1"), (refuse(BAD, TOO_LARGE),), "huge method"),
        (
            line(b"PATCH /x HTTP/1.1", b"Content-Length: 2\r\n") + b"ok",
            (forward(Fwd(b"PATCH", b"/x", b"ok")),),
            "PATCH",
        ),
        (line(b"PROPFIND /x HTTP/1.1"), (forward(Fwd(b"PROPFIND", b"/x")),), "WebDAV"),
        (line(b"GET /" + b"a" * 70_000 + b" HTTP/1.1"), (refuse(TOO_LARGE),), "huge target"),
    ]
    return numbered("request-line", items)


def host_cases() -> Iterator[Case]:
    """Host tricks: the target's Host always, one Host upstream, the second target untouched."""
    ok = (forward(get()),)
    either = (refuse(BAD), forward(get()))
    items = [
        (b"Host: " + SILENT + b"\r\n", ok, "Host names the second target"),
        (b"Host: " + SILENT + b"\r\nHost: " + SILENT + b"\r\n", either, "two equal Hosts"),
        (b"Host: " + SILENT + b"\r\nHost: app.test\r\n", either, "two different Hosts"),
        (b"", either, "no Host in HTTP/1.1"),
        (b"Host:\r\n", either, "empty Host"),
        (b"Host: x@" + SILENT + b"\r\n", either, "userinfo in Host"),
        (b"Host: " + SILENT + b"\x00\r\n", (refuse(BAD),), "NUL in Host"),
        (b"Host: " + SILENT + b" evil\r\n", either, "space in Host"),
        (b"Host: [::1]:1\r\n", either, "IPv6 literal"),
        (b"Host:\t" + SILENT + b"\r\n", ok, "HTAB before Host"),
        (b"Host: " + b"h" * 5000 + b"\r\n", either, "long Host"),
        (b"Host: app.test\r\nX-Forwarded-Host: " + SILENT + b"\r\n", ok, "X-Forwarded-Host"),
    ]
    for n, (fields, outcomes, note) in enumerate(items, 1):
        yield Case(
            f"request-host-{n:02d}",
            b"GET /x HTTP/1.1\r\n" + fields + b"\r\n",
            outcomes,
            note=note,
        )
    yield Case(
        f"request-host-{len(items) + 1:02d}",
        b"GET http://" + SILENT + b"/x HTTP/1.1\r\nHost: " + SILENT + b"\r\n\r\n",
        (forward(get()),),
        note="absolute-form and Host both name the second target",
    )
    yield Case(
        f"request-host-{len(items) + 2:02d}",
        b"GET /x HTTP/1.0\r\n\r\n",
        (forward(get()),),
        note="HTTP/1.0 without Host",
    )


def trace_connect_cases() -> Iterator[Case]:
    """TRACE is refused (405): an upstream that reflects requests (this one does) would hand
    the injected token to the app. CONNECT is never tunnelled (405)."""
    trace = [
        b"TRACE / HTTP/1.1\r\n" + HOST + b"\r\n",
        b"TRACE / HTTP/1.1\r\n" + HOST + b"Max-Forwards: 0\r\n\r\n",
        b"TRACE http://" + SILENT + b"/ HTTP/1.1\r\n" + HOST + b"\r\n",
        b"TRACE / HTTP/1.1\r\n" + HOST + b"X-Sidecar-Account: other\r\n\r\n",
        b"TRACE / HTTP/1.0\r\n\r\n",
        b"TRACE /x HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n\r\nhello",
    ]
    for n, data in enumerate(trace, 1):
        yield Case(f"request-trace-{n:02d}", data, (refuse(NOT_ALLOWED),), reply="reflect")
    yield Case(
        "request-trace-07",
        b"GET /x HTTP/1.1\r\n" + HOST + b"\r\nTRACE / HTTP/1.1\r\n" + HOST + b"\r\n",
        (forward(get(), then=(NOT_ALLOWED,)),),
        reply="reflect",
        note="pipelined after a GET",
    )
    for n, method in enumerate((b"trace", b"TRACK", b"Trace"), 8):
        yield Case(
            f"request-trace-{n:02d}",
            method + b" / HTTP/1.1\r\n" + HOST + b"\r\n",
            (refuse(BAD, NOT_ALLOWED),),
            reply="reflect",
            note="near-TRACE methods reach a reflecting upstream if forwarded",
        )
    connect = [
        b"CONNECT " + SILENT + b" HTTP/1.1\r\nHost: " + SILENT + b"\r\n\r\n",
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
        b"CONNECT " + SILENT + b" HTTP/1.1\r\nHost: " + SILENT + b"\r\n\r\n" + SMUGGLE,
        b"CONNECT " + SILENT + b" HTTP/1.0\r\n\r\n",
    ]
    for n, data in enumerate(connect, 1):
        yield Case(f"request-connect-{n:02d}", data, (refuse(NOT_ALLOWED),), reply="reflect")
    for n, target in enumerate((b"http://" + SILENT + b"/", b"/x"), len(connect) + 1):
        yield Case(
            f"request-connect-{n:02d}",
            b"CONNECT " + target + b" HTTP/1.1\r\n" + HOST + b"\r\n",
            (refuse(NOT_ALLOWED, BAD, INVALID_PATH),),
            reply="reflect",
        )


def account_cases() -> Iterator[Case]:
    """X-Sidecar-Account is routing input: ambiguous or empty is refused (400
    ``invalid_account_header``), never resolved by "last wins" or ``default_account``."""

    def req(fields: bytes, body: bytes = b"") -> bytes:
        return b"GET /x HTTP/1.1\r\n" + HOST + fields + b"\r\n" + body

    name = b"X-Sidecar-Account"
    items: list[tuple[bytes, tuple[Outcome, ...], str]] = []
    for first, second in [
        (b"main", b"other"),
        (b"other", b"main"),
        (b"main", b"main"),
        (b"other", b""),
        (b"", b"other"),
    ]:
        fields = name + b": " + first + b"\r\n" + name + b": " + second + b"\r\n"
        items.append((req(fields), (refuse(ACCOUNT),), f"two fields {first!r}, {second!r}"))
    items.append(
        (
            req(b"X-Sidecar-Account: other\r\nx-sidecar-account: main\r\n"),
            (refuse(ACCOUNT),),
            "two fields, differing case",
        )
    )
    items.append((req((name + b": other\r\n") * 3), (refuse(ACCOUNT),), "three fields"))
    for value in (b"", b" ", b"\t", b" \t "):
        items.append((req(name + b":" + value + b"\r\n"), (refuse(ACCOUNT),), f"empty {value!r}"))
    items.append(
        (
            req(name + b": main, other\r\n"),
            (refuse(ACCOUNT, UNKNOWN_ACCOUNT),),
            "a list in one field",
        )
    )
    items.append((req(name + b": other\r\n"), (forward(get(account="other")),), "other"))
    items.append((req(name + b":  other \t\r\n"), (forward(get(account="other")),), "OWS"))
    items.append((req(b"x-sidecar-account: other\r\n"), (forward(get(account="other")),), "case"))
    items.append((req(name + b": nobody\r\n"), (refuse(UNKNOWN_ACCOUNT),), "unknown account"))
    items.append(
        (
            b"POST /x HTTP/1.1\r\n"
            + HOST
            + name
            + b": main\r\n"
            + name
            + b": other\r\nContent-Length: 5\r\n\r\nhello",
            (refuse(ACCOUNT),),
            "two fields on a POST with a body",
        )
    )
    return numbered("request-account", items)


def trailer_cases() -> Iterator[Case]:
    """Trailers never change the request's headers, account or routing (dropped, or passed
    as trailers): the target gets main's token and no trailer field in the head."""
    trailers = [
        b"X-Sidecar-Account: other\r\n",
        b"Authorization: Bearer " + FORGED + b"\r\n",
        b"Host: " + SILENT + b"\r\n",
        b"Content-Length: 100\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"X-Probe: " + PROBE_TRAILER + b"\r\n",
        b"X-Sidecar-Account: other\r\nX-Sidecar-Account: main\r\n",
    ]
    n = 0
    for replay in (None, 2):
        for account_field in (b"X-Sidecar-Account: main\r\n", b""):
            for trailer in trailers if account_field else trailers[:1]:
                n += 1
                data = (
                    b"POST /x HTTP/1.1\r\n"
                    + HOST
                    + account_field
                    + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                    + trailer
                    + b"\r\n"
                )
                # Framing fields in a trailer (RFC 9110 §6.5.1) are ignored, or the request
                # refused; the account and credential fields must just not take effect.
                framing = trailer.startswith((b"Content-Length", b"Transfer-Encoding"))
                yield Case(
                    f"request-trailer-{n:02d}",
                    data,
                    (forward(post()), refuse(BAD)) if framing else (forward(post()),),
                    upstream=(() if replay is None else (("replay_limit_bytes", replay),)),
                    note=f"trailer {trailer!r}" + (", streamed body" if replay else ""),
                )


MALFORMED_TAILS = [
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET /y HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET /y HTTP/9.9\r\n" + HOST + b"\r\n",
    b"POST /y HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLE,
    b"GET /y HTTP/1.1\r\n" + HOST + b"X A: b\r\n\r\n",
]


def pipeline_cases() -> Iterator[Case]:
    """A valid request, then a malformed one in the same write: the valid one gets its whole
    answer first, then 400 ``bad_request``, then the connection closes."""
    valid = [
        (b"GET /ok HTTP/1.1\r\n" + HOST + b"\r\n", Fwd(b"GET", b"/ok")),
        (
            b"POST /ok HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n\r\nhello",
            Fwd(b"POST", b"/ok", b"hello"),
        ),
        (
            b"POST /ok HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + HELLO_CHUNKED,
            Fwd(b"POST", b"/ok", b"hello"),
        ),
        (b"HEAD /ok HTTP/1.1\r\n" + HOST + b"\r\n", Fwd(b"HEAD", b"/ok")),
    ]
    n = 0
    for data, fwd in valid:
        for tail in MALFORMED_TAILS:
            n += 1
            yield Case(f"request-pipeline-{n:02d}", data + tail, (forward(fwd, then=(BAD,)),))
    n += 1
    yield Case(
        f"request-pipeline-{n:02d}",
        valid[0][0] + valid[1][0].replace(b"/ok", b"/ok2") + MALFORMED_TAILS[0],
        (forward(valid[0][1], Fwd(b"POST", b"/ok2", b"hello"), then=(BAD,)),),
    )


def connection_end_cases() -> Iterator[Case]:
    """Bytes after a request that ends the connection (RFC 9112 §9.6 ``Connection: close``,
    HTTP/1.0 without keep-alive, an Upgrade the sidecar does not tunnel) are never read as
    another request."""
    ends = [
        b"GET /x HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n",
        b"GET /x HTTP/1.0\r\n" + HOST + b"\r\n",
        b"GET /x HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET /x HTTP/1.1\r\n" + HOST + b"Connection: keep-alive, close\r\n\r\n",
        b"POST /x HTTP/1.1\r\n" + HOST + b"Connection: close\r\nContent-Length: 5\r\n\r\nhello",
    ]
    for n, head in enumerate(ends, 1):
        fwd = post() if head.startswith(b"POST") else get()
        yield Case(f"request-close-{n:02d}", head + SMUGGLE, (forward(fwd),))


def valid_cases() -> Iterator[Case]:
    """Controls: plain requests every correct proxy forwards."""
    yield Case("request-valid-01", b"GET /x HTTP/1.1\r\n" + HOST + b"\r\n", (forward(get()),))
    yield Case("request-valid-02", _post(b"Content-Length: 5\r\n", b"hello"), (forward(post()),))
    yield Case(
        "request-valid-03",
        _post(b"Transfer-Encoding: chunked\r\n", HELLO_CHUNKED),
        (forward(post()),),
    )
    yield Case(
        "request-valid-04",
        b"GET /1 HTTP/1.1\r\n"
        + HOST
        + b"\r\nGET /2 HTTP/1.1\r\n"
        + HOST
        + b"X-Sidecar-Account: other\r\n\r\nGET /3 HTTP/1.1\r\n"
        + HOST
        + b"\r\n",
        (forward(get(b"/1"), get(b"/2", "other"), get(b"/3")),),
    )
    yield Case("request-valid-05", b"GET /x HTTP/1.0\r\n" + HOST + b"\r\n", (forward(get()),))
    yield Case(
        "request-valid-06",
        _post(b"Content-Length: 5\r\nExpect: 100-continue\r\n", b"hello"),
        (forward(post()),),
    )


def all_cases() -> list[Case]:
    cases = [
        *valid_cases(),
        *clte_cases(),
        *content_length_cases(),
        *transfer_encoding_cases(),
        *chunk_cases(),
        *http10_cases(),
        *line_ending_cases(),
        *obs_fold_cases(),
        *control_char_cases(),
        *header_name_cases(),
        *request_line_cases(),
        *host_cases(),
        *trace_connect_cases(),
        *account_cases(),
        *trailer_cases(),
        *pipeline_cases(),
        *connection_end_cases(),
    ]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return cases


# ---------------------------------------------------------------------------------------------
# Running and judging one case


async def run_case(rig: Rig, case: Case) -> list[str]:
    """Send the case on one app connection, then a probe request if the connection is still
    open; every reason the run is wrong (empty when right)."""
    app = await rig.connect()
    await app.send(rig.fill(case.data))
    result = await app.read(case.frames)
    requests = list(rig.upstream.requests)
    problems = judge(case, rig, result, requests)
    if not problems:
        problem = await probe_problem(rig, app, result)
        problems += [problem] if problem else []
        problems += rig.problems()
    return problems


def outcome_problem(
    outcome: Outcome, rig: Rig, result: AppResult, requests: list[UpRequest]
) -> str | None:
    """Why what happened is not ``outcome`` (None when it is)."""
    got = [(r.method, r.target, r.body, r.account) for r in requests]
    want = [(f.method, rig.fill(f.path), f.body, f.account) for f in outcome.forwarded]
    if got != want:
        return f"target received {_short(got)}, expected {_short(want)}"
    if result.malformed:
        return f"malformed answer to the app: {result.malformed}"
    for i, (req, fwd) in enumerate(zip(requests, outcome.forwarded, strict=True)):
        if i >= len(result.frames):
            return f"no answer for forwarded request {i}"
        frame = result.frames[i]
        expected = b"" if fwd.method == b"HEAD" else answer_body(req)
        if frame.status != 200 or frame.header(b"x-sidecar-error") or frame.body != expected:
            return f"answer {i} is {frame.describe()} {frame.body[:80]!r}, not its own"
    if outcome.errors:
        return error_problem(result, len(outcome.forwarded), outcome.errors)
    if len(result.frames) != len(outcome.forwarded) or result.rest:
        return f"unexpected extra bytes: {result.describe()}"
    return None


def _short(requests: list[tuple[bytes, bytes, bytes, str]]) -> str:
    return str([(m.decode("latin-1"), t[:60], b[:20], a) for m, t, b, a in requests])


def judge(case: Case, rig: Rig, result: AppResult, requests: list[UpRequest]) -> list[str]:
    """Every reason this run is wrong: shared invariants, plus no acceptable outcome matched."""
    problems = rig.problems()
    mismatches = [outcome_problem(o, rig, result, requests) for o in case.outcomes]
    if all(m is not None for m in mismatches):
        problems.append(f"app got {result.describe()}")
        for outcome, mismatch in zip(case.outcomes, mismatches, strict=True):
            problems.append(f"  not [{outcome.describe()}]: {mismatch}")
    return problems
