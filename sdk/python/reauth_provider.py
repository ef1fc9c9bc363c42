"""Helpers for reauth providers written in Python (componentize-py).

A provider is a class named ``AuthProvider`` in your ``app.py``, subclassing
``wit_world.exports.AuthProvider`` (the bindings componentize-py generates from
``wit/provider.wit``)::

    from wit_world import exports
    import reauth_provider as rp

    class AuthProvider(exports.AuthProvider):
        def get_credentials(self, request):
            return rp.bearer(rp.config.required("token"), expires_in=3600)

        def handle_security_error(self, request, credentials, error):
            return rp.refresh_on_unauthorized(error)

What this module offers:

- ``config``: the provider's configuration (``get``, ``required``, ``all``);
- ``state``: small values the host persists across calls and restarts;
- ``bearer``/``basic``/``headers``: credentials with ``expires_in``/``expires_at``
  (seconds since the epoch) and ``principal``;
- ``unavailable``/``denied``/``misconfigured``: provider errors to ``raise``;
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
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import quote, urlsplit

from componentize_py_types import Err
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
    "oauth2_error", "now", "Reason", "SecurityErrorKind",
]

Reason = t.Reason
SecurityErrorKind = t.SecurityErrorKind


# --- errors ------------------------------------------------------------------

def unavailable(message: str) -> Err:
    """Transient failure (IdP down, 5xx, timeout): ``raise rp.unavailable("...")``.
    The host backs off and keeps serving a still-valid cached credential."""
    return Err(t.ProviderError_Unavailable(message))


def denied(message: str) -> Err:
    """The IdP refused (bad secret, revoked grant): not retried hot."""
    return Err(t.ProviderError_Denied(message))


def misconfigured(message: str) -> Err:
    """The provider's configuration is wrong or incomplete."""
    return Err(t.ProviderError_Misconfigured(message))


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
            return unavailable(f"token endpoint answered HTTP {status}")
        if status in (401, 403):
            return denied(f"token endpoint refused the client (HTTP {status})")
        return misconfigured(f"token endpoint answered HTTP {status} without an OAuth2 error")
    clean = "".join(c for c in error if c.isprintable())[:200]
    detail = f"{clean} (HTTP {status})"
    if error in ("invalid_client", "unauthorized_client", "invalid_grant", "access_denied"):
        return denied(detail)
    if error in ("temporarily_unavailable", "server_error") or status >= 500 or status == 429:
        return unavailable(detail)
    return misconfigured(detail)
