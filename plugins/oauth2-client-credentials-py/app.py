"""`oauth2-client-credentials-py`: the OAuth2 client-credentials grant (RFC 6749
§4.4), written in Python with the reauth Python kit.

Config:
- `token_url`, or `issuer` (OpenID Connect discovery; the token endpoint is
  remembered in the provider's state);
- `client_id`, `client_secret`;
- `auth_method`: `client_secret_basic` (default) or `client_secret_post`;
- `scope` (space-separated; a request's scopes override it), `audience` (a
  request's audience overrides it, sent as `audience_param`, default `audience`);
- `timeout_ms` towards the IdP (default 10000).

Expiry: `expires_in`, else the access token's JWT `exp`. Principal: `client_id`.
IdP errors: `invalid_client`/`invalid_grant`/… ⇒ denied; 5xx/429/transport ⇒
unavailable; other 4xx ⇒ misconfigured. Security errors: `token-expired` or
`unauthorized` ⇒ refresh-and-retry, anything else ⇒ fail.
"""

import reauth_provider as rp


def token_endpoint(timeout_ms: int) -> str:
    url = rp.config.get("token_url")
    if url:
        return url
    issuer = rp.config.get("issuer")
    if not issuer:
        raise rp.misconfigured("config needs `token_url` or `issuer`")
    issuer = issuer.rstrip("/")
    remembered = rp.state.get("discovery")
    if remembered and remembered.startswith(issuer + " "):
        return remembered.split(" ", 1)[1]
    response = rp.http.get(f"{issuer}/.well-known/openid-configuration", timeout_ms=timeout_ms)
    if response.status >= 500 or response.status == 429:
        raise rp.unavailable(f"discovery answered HTTP {response.status}",
                             retry_after_ms=response.retry_after_ms())
    if not response.ok:
        raise rp.misconfigured(f"discovery at `issuer` answered HTTP {response.status}")
    document = response.json()
    if document.get("issuer", "").rstrip("/") != issuer:
        raise rp.misconfigured("discovery document names another issuer than config `issuer`")
    url = document.get("token_endpoint")
    if not isinstance(url, str):
        raise rp.misconfigured("discovery document has no `token_endpoint`")
    rp.state.set("discovery", f"{issuer} {url}")
    return url


class AuthProvider(rp.Provider):
    def describe(self):
        return rp.describe("oauth2-client-credentials-py", "0.2.0", [
            rp.key("token_url", "url", help="the token endpoint; or `issuer`"),
            rp.key("issuer", "url", help="OpenID Connect issuer (discovery); or `token_url`"),
            rp.key("client_id", required=True, help="the OAuth2 client id"),
            rp.key("client_secret", required=True, secret=True, help="the client's secret"),
            rp.key("auth_method", help="client_secret_basic (default) or client_secret_post"),
            rp.key("scope", help="space-separated default scopes"),
            rp.key("audience", help="default audience"),
            rp.key("audience_param", help="`audience` (default) or `resource`"),
            rp.key("timeout_ms", "integer", help="timeout towards the IdP (ms)"),
        ])

    def get_credentials(self, request):
        if request.subject is not None:
            raise rp.misconfigured(
                "the client-credentials grant has no per-subject tokens; drop `subject`")
        client_id = rp.config.required("client_id")
        secret = rp.config.required("client_secret")
        method = rp.config.get("auth_method", "client_secret_basic")
        timeout_ms = int(rp.config.get("timeout_ms", "10000"))
        form = {"grant_type": "client_credentials"}
        scope = " ".join(request.scopes) if request.scopes else rp.config.get("scope")
        if scope:
            form["scope"] = scope
        audience = request.audience or rp.config.get("audience")
        if audience:
            form[rp.config.get("audience_param", "audience")] = audience
        headers = {"accept": "application/json"}
        if method == "client_secret_basic":
            headers["authorization"] = rp.basic_auth_header(client_id, secret)
        elif method == "client_secret_post":
            form["client_id"] = client_id
            form["client_secret"] = secret
        else:
            raise rp.misconfigured(
                f"config key `auth_method`: unsupported {method!r} "
                "(client_secret_basic or client_secret_post)")
        response = rp.http.post(token_endpoint(timeout_ms), headers=headers, form=form,
                                timeout_ms=timeout_ms)
        if not response.ok:
            if response.status == 404 and rp.config.get("issuer"):
                rp.state.delete("discovery")
            raise rp.oauth2_error(response)
        body = response.json()
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise rp.unavailable("token response has no `access_token`")
        expires_in = body.get("expires_in")
        if isinstance(expires_in, (int, float)) and expires_in > 0:
            return rp.bearer(token, expires_in=int(expires_in), principal=client_id)
        return rp.bearer(token, expires_at=rp.jwt_expiry(token), principal=client_id)

    def handle_security_error(self, request, credentials, error):
        return rp.refresh_on_unauthorized(error)
