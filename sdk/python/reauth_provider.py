"""Helpers for reauth providers written in Python (componentize-py).

A provider is a class named ``AuthProvider`` in your ``app.py``, subclassing
``wit_world.exports.AuthProvider`` (the bindings componentize-py generates from
``wit/provider.wit``)::

    import reauth_provider as rp

    class AuthProvider(rp.Provider):
        def describe(self):
            return rp.describe("my-provider", "1.0.0", [
                rp.key("token", required=True, secret=True, help="the token"),
            ])

        def get_credentials(self, request):
            return rp.bearer(rp.config.required("token"), expires_in=3600)

        def handle_security_error(self, request, credentials, error):
            return rp.refresh_on_unauthorized(error)

``rp.Provider`` is ``wit_world.exports.AuthProvider`` with a default
``describe`` (no schema declared) and a safety net: an exception that is not a
provider error is logged with its traceback (at WARN, redacted by the host) and
becomes ``unavailable`` for ``get_credentials`` / ``fail`` for
``handle_security_error``, instead of a trap.

What this module offers:

- ``Provider``, ``describe``/``key``: the provider's name, version and config
  schema (contract 0.2: the host checks the config against it and redacts the
  keys declared secret);

- ``config``: the provider's configuration (``get``, ``required``, ``all``);
- ``state``: small values the host persists across calls and restarts;
- ``bearer``/``basic``/``headers``: credentials with ``expires_in``/``expires_at``
  (seconds since the epoch) and ``principal``;
- ``unavailable``/``denied``/``misconfigured``: provider errors to ``raise``
  (``unavailable(msg, retry_after_ms=...)`` passes the IdP's ``Retry-After`` on);
- ``challenge(error, scheme)``: a security error's ``WWW-Authenticate`` challenge
  of that scheme (``.scheme``, ``.params``, ``.token68``), with ``param(c, name)``;
- ``refresh_and_retry``/``retry_after``/``fail``: decisions;
- ``http``: requests over ``wasi:http`` (the host's egress allow-list applies);
- ``jwt_claims``/``jwt_expiry``: read a JWT's claims (no signature check);
- ``oauth2_error``: map a token endpoint's error response to a provider error;
- ``now``: the host's clock (virtual under ``reauth test``).

Every time-dependent helper reads the host's clock (``wasi:clocks``), never
anything else, so a provider behaves the same under ``reauth test``'s virtual clock.
"""

import base64
import json
import sys
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import quote, urlsplit

from componentize_py_types import Err
from wit_world import exports as _exports
from wit_world.imports import metadata as _meta
from wit_world.imports import outgoing_handler
from wit_world.imports import reauth_provider_types as t
from wit_world.imports import state as _state
from wit_world.imports import store as _store
from wit_world.imports import streams, wall_clock
from wit_world.imports import wasi_http_types as h

__all__ = [
    "config", "state", "bearer", "basic", "headers", "unavailable", "denied",
    "misconfigured", "refresh_and_retry", "retry_after", "fail",
    "refresh_on_unauthorized", "http", "Response", "jwt_claims", "jwt_expiry",
    "oauth2_error", "now", "Reason", "SecurityErrorKind", "Provider", "describe", "key",
    "challenge", "param", "basic_auth_header",
]

Reason = t.Reason
SecurityErrorKind = t.SecurityErrorKind


# --- errors ------------------------------------------------------------------

def unavailable(message: str, retry_after_ms: Optional[int] = None) -> Err:
    """Transient failure (IdP down, 5xx, 429, timeout): ``raise rp.unavailable("...")``.
    The host backs off and keeps serving a still-valid cached credential; with
    ``retry_after_ms`` (e.g. ``response.retry_after_ms()``) it waits that long
    instead of its own backoff step."""
    after = None
    if retry_after_ms is not None:
        after = max(0, min(int(retry_after_ms), 2**64 - 1))
    return Err(t.ProviderError_Unavailable(t.Outage(message, after)))


def denied(message: str) -> Err:
    """The IdP refused (bad secret, revoked grant): not retried hot."""
    return Err(t.ProviderError_Denied(message))


def misconfigured(message: str) -> Err:
    """The provider's configuration is wrong or incomplete."""
    return Err(t.ProviderError_Misconfigured(message))


# --- describe ----------------------------------------------------------------

_TYPES = {
    "text": _meta.ValueType.TEXT, "integer": _meta.ValueType.INTEGER,
    "boolean": _meta.ValueType.BOOLEAN, "url": _meta.ValueType.URL,
}


def key(name: str, type: str = "text", *, required: bool = False, secret: bool = False,
        help: str = "") -> _meta.ConfigKey:
    """One config key of the schema: ``type`` is ``text``, ``integer``,
    ``boolean`` or ``url``."""
    if type not in _TYPES:
        raise ValueError(f"config key {name!r}: type must be one of {sorted(_TYPES)}")
    return _meta.ConfigKey(name, _TYPES[type], required, secret, help)


def describe(name: str, version: str, keys: Optional[List[_meta.ConfigKey]] = None
             ) -> _meta.Descriptor:
    """The provider's name, version and config schema. With ``keys`` the host
    refuses config keys not in it, missing required keys and values of the wrong
    type, naming the key; without, nothing is checked."""
    return _meta.Descriptor(name, version, list(keys) if keys is not None else None)


def _warn(what: str) -> None:
    # stderr of a failed call is logged by the host at WARN, redacted.
    print(f"{what}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)


class Provider(_exports.AuthProvider):
    """Subclass this (as ``AuthProvider`` in ``app.py``). ``describe`` defaults
    to an undeclared schema; exceptions that are not provider errors are logged
    with their traceback and reported as ``unavailable`` / ``fail``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        get = cls.__dict__.get("get_credentials")
        if get is not None:
            def get_credentials(self, request, _get=get):
                try:
                    return _get(self, request)
                except Err:
                    raise
                except Exception as e:
                    _warn("get_credentials raised")
                    raise unavailable(f"provider raised {type(e).__name__}: {e}"[:500])
            cls.get_credentials = get_credentials
        handle = cls.__dict__.get("handle_security_error")
        if handle is not None:
            def handle_security_error(self, request, credentials, error, _handle=handle):
                try:
                    return _handle(self, request, credentials, error)
                except Exception:
                    _warn("handle_security_error raised")
                    return fail()
            cls.handle_security_error = handle_security_error

    def describe(self) -> _meta.Descriptor:
        return describe("", "", None)


def challenge(error: t.SecurityError, scheme: str) -> Optional[t.Challenge]:
    """The first ``WWW-Authenticate`` challenge of ``scheme`` (case-insensitive)
    the server sent with this security error."""
    scheme = scheme.lower()
    return next((c for c in error.challenges if c.scheme.lower() == scheme), None)


def param(c: Optional[t.Challenge], name: str) -> Optional[str]:
    """Parameter ``name`` (case-insensitive) of challenge ``c``."""
    if c is None:
        return None
    name = name.lower()
    return next((v for k, v in c.params if k.lower() == name), None)


# --- decisions ---------------------------------------------------------------

def refresh_and_retry() -> t.Decision:
    """Drop the cached credential, fetch a new one and re-run the operation."""
    return t.Decision_RefreshAndRetry()


def retry_after(ms: int) -> t.Decision:
    """Re-run the operation after ``ms`` milliseconds with the same credential."""
    return t.Decision_RetryAfter(ms)


def fail() -> t.Decision:
    """Give up: the caller gets the error."""
    return t.Decision_Fail()


def refresh_on_unauthorized(error: t.SecurityError) -> t.Decision:
    """The usual bearer-token policy: ``token-expired``/``unauthorized`` ⇒
    refresh-and-retry; ``forbidden`` (a new token will not grant a missing
    permission) and anything else ⇒ fail."""
    if error.kind in (t.SecurityErrorKind.TOKEN_EXPIRED, t.SecurityErrorKind.UNAUTHORIZED):
        return refresh_and_retry()
    return fail()


# --- config and state --------------------------------------------------------

class _Config:
    """The provider's ``[providers.<name>.config]`` table, via ``wasi:config``."""

    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        try:
            value = _store.get(key)
        except Err as e:
            raise misconfigured(f"reading config key `{key}`: {e.value}")
        return default if value is None else value

    def required(self, key: str) -> str:
        """The value of ``key``; a ``misconfigured`` error naming it when absent."""
        value = self.get(key)
        if value is None or value == "":
            raise misconfigured(f"config key `{key}` is required")
        return value

    def all(self) -> List[Tuple[str, str]]:
        try:
            return _store.get_all()
        except Err as e:
            raise misconfigured(f"reading the config: {e.value}")


class _State:
    """A small key/value store the host persists atomically across calls and
    restarts (e.g. a rotated refresh token)."""

    def get(self, key: str) -> Optional[str]:
        return _state.get(key)

    def set(self, key: str, value: str) -> None:
        """Store durably before returning; raises ``unavailable`` if the host
        could not persist it."""
        try:
            _state.set(key, value)
        except Err as e:
            raise unavailable(f"could not persist state `{key}`: {e.value}")

    def delete(self, key: str) -> None:
        try:
            _state.delete(key)
        except Err as e:
            raise unavailable(f"could not delete state `{key}`: {e.value}")


config = _Config()
state = _State()


# --- time and credentials ----------------------------------------------------

def now() -> int:
    """Seconds since the Unix epoch, from the host's clock."""
    return wall_clock.now().seconds


def _credentials(credential, expires_in, expires_at, principal) -> t.Credentials:
    if expires_in is not None and expires_at is not None:
        raise ValueError("give expires_in or expires_at, not both")
    if expires_in is not None:
        expires_at = now() + int(expires_in)
    expiry = None if expires_at is None else wall_clock.Datetime(int(expires_at), 0)
    return t.Credentials(credential, expiry, principal)


def bearer(token: str, *, expires_in: Optional[int] = None, expires_at: Optional[int] = None,
           principal: Optional[str] = None) -> t.Credentials:
    """A bearer token. Without an expiry the host reads a JWT's ``exp``."""
    return _credentials(t.Credential_Bearer(token), expires_in, expires_at, principal)


def basic(username: str, password: str, *, expires_in: Optional[int] = None,
          expires_at: Optional[int] = None, principal: Optional[str] = None) -> t.Credentials:
    """A username and password."""
    return _credentials(t.Credential_Basic(t.BasicAuth(username, password)), expires_in,
                        expires_at, principal)


def headers(values: Dict[str, str], *, expires_in: Optional[int] = None,
            expires_at: Optional[int] = None, principal: Optional[str] = None) -> t.Credentials:
    """Arbitrary headers (API keys, custom schemes)."""
    return _credentials(t.Credential_Headers(list(values.items())), expires_in, expires_at,
                        principal)


# --- JWT ---------------------------------------------------------------------

def jwt_claims(token: str) -> Optional[dict]:
    """The claims of a JWT, unverified (to read ``exp``/``sub``); None if ``token``
    is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except Exception:
        return None
    return claims if isinstance(claims, dict) else None


def jwt_expiry(token: str) -> Optional[int]:
    """A JWT's ``exp`` (seconds since the epoch), if it has one."""
    claims = jwt_claims(token)
    exp = claims.get("exp") if claims else None
    return int(exp) if isinstance(exp, (int, float)) else None


# --- HTTP over wasi:http -----------------------------------------------------

@dataclass
class Response:
    """An HTTP response, read whole."""
    status: int
    headers: List[Tuple[str, str]]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self):
        """The body as JSON; ``unavailable`` if it is not."""
        try:
            return json.loads(self.body)
        except ValueError:
            raise unavailable(f"expected JSON, got HTTP {self.status} with "
                              f"{len(self.body)} bytes that are not")

    def retry_after_ms(self) -> Optional[int]:
        """The ``Retry-After`` header in milliseconds (delta-seconds, or an HTTP
        date relative to the host's clock), if usable."""
        value = (self.header("retry-after") or "").strip()
        if not value or len(value) > 64:
            return None
        if value.isascii() and value.isdigit():
            return min(int(value), 86_400) * 1000
        try:
            from email.utils import parsedate_to_datetime
            at = parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        return max(0, int(at) - now()) * 1000

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


_METHODS = {
    "GET": h.Method_Get(), "POST": h.Method_Post(), "PUT": h.Method_Put(),
    "DELETE": h.Method_Delete(), "HEAD": h.Method_Head(), "PATCH": h.Method_Patch(),
}


class _Http:
    """Blocking HTTP over ``wasi:http/outgoing-handler``. Every request passes the
    host's ``allowed_hosts``; a denied or failed request raises ``unavailable``
    naming the host (so a network problem is never mistaken for a refusal)."""

    def request(self, method: str, url: str, *, headers: Optional[Dict[str, str]] = None,
                body: Union[bytes, str, None] = None, form: Optional[Dict[str, str]] = None,
                timeout_ms: int = 10_000) -> Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise misconfigured(f"not an http(s) URL: {url!r}")
        fields = [(k, v.encode()) for k, v in (headers or {}).items()]
        if form is not None:
            body = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in form.items())
            fields.append(("content-type", b"application/x-www-form-urlencoded"))
        if isinstance(body, str):
            body = body.encode()
        # A body goes out with its length, never chunked: strict servers (Python's
        # http.server, many appliances) refuse chunked request bodies.
        if body and not any(k.lower() == "content-length" for k, _ in fields):
            fields.append(("content-length", str(len(body)).encode()))
        request = h.OutgoingRequest(h.Fields.from_list(fields))
        request.set_method(_METHODS.get(method.upper()) or h.Method_Other(method.upper()))
        request.set_scheme(h.Scheme_Https() if parts.scheme == "https" else h.Scheme_Http())
        request.set_authority(parts.netloc)
        request.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        outgoing = request.body()
        if body:
            stream = outgoing.write()
            for i in range(0, len(body), 4096):
                stream.blocking_write_and_flush(body[i:i + 4096])
            stream.__exit__(None, None, None)
        h.OutgoingBody.finish(outgoing, None)
        options = h.RequestOptions()
        nanos = int(timeout_ms) * 1_000_000
        options.set_connect_timeout(nanos)
        options.set_first_byte_timeout(nanos)
        options.set_between_bytes_timeout(nanos)
        try:
            future = outgoing_handler.handle(request, options)
        except Err as e:
            raise unavailable(f"{method} {parts.netloc}: {_describe(e.value)}")
        with future.subscribe() as pollable:
            pollable.block()
        result = future.get()
        future.__exit__(None, None, None)
        if result is None or isinstance(result, Err):
            raise unavailable(f"{method} {parts.netloc}: no response")
        inner = result.value
        if isinstance(inner, Err):
            raise unavailable(f"{method} {parts.netloc}: {_describe(inner.value)}")
        response = inner.value
        status = response.status()
        with response.headers() as fields:
            response_headers = [(k, v.decode("latin-1")) for k, v in fields.entries()]
        incoming = response.consume()
        chunks = []
        with incoming.stream() as stream:
            while True:
                try:
                    chunks.append(stream.blocking_read(65536))
                except Err as e:
                    if isinstance(e.value, streams.StreamError_Closed):
                        break
                    raise unavailable(f"{method} {parts.netloc}: reading the body failed")
        h.IncomingBody.finish(incoming)
        response.__exit__(None, None, None)
        return Response(status, response_headers, b"".join(chunks))

    def get(self, url: str, **kwargs) -> Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs) -> Response:
        return self.request("POST", url, **kwargs)


def _describe(code) -> str:
    if isinstance(code, h.ErrorCode_HttpRequestDenied):
        return "denied by the host (not in allowed_hosts, or plain http)"
    name = type(code).__name__.replace("ErrorCode_", "")
    return f"transport error {name}"


http = _Http()


def basic_auth_header(username: str, password: str) -> str:
    """``Basic …`` for an ``Authorization`` header (RFC 6749 §2.3.1 encoding)."""
    pair = f"{quote(username, safe='')}:{quote(password, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


# --- OAuth2 ------------------------------------------------------------------

def oauth2_error(response: Response) -> Err:
    """Map a failed token-endpoint response to a provider error: ``denied`` for a
    refused client or grant, ``unavailable`` for 5xx/429/408, ``misconfigured``
    for a bad request."""
    status = response.status
    try:
        body = json.loads(response.body)
        error = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        error = None
    if not isinstance(error, str):
        if status >= 500 or status in (429, 408):
            return unavailable(f"token endpoint answered HTTP {status}",
                               retry_after_ms=response.retry_after_ms())
        if status in (401, 403):
            return denied(f"token endpoint refused the client (HTTP {status})")
        return misconfigured(f"token endpoint answered HTTP {status} without an OAuth2 error")
    clean = "".join(c for c in error if c.isprintable())[:200]
    detail = f"{clean} (HTTP {status})"
    if error in ("invalid_client", "unauthorized_client", "invalid_grant", "access_denied"):
        return denied(detail)
    if error in ("temporarily_unavailable", "server_error") or status >= 500 or status == 429:
        return unavailable(detail, retry_after_ms=response.retry_after_ms())
    return misconfigured(detail)
