"""`acme-sts-py`: the Acme STS provider of `plugins/acme-sts`, in Python.

A company STS that is not OAuth2: `POST <sts_url>/sts/session` with `X-Api-Key`
and a JSON body `{"user", "audience"}` answers `{"session", "ttl", "user"}`, or
429 with `Retry-After`. Resource servers answer 401 with `WWW-Authenticate:
AcmeSession error="expired"` (⇒ refresh-and-retry) or `error="revoked"` (⇒ fail:
an administrator ended the session), and 403 for another audience (⇒ fail).
"""

import json

import reauth_provider as rp


class AuthProvider(rp.Provider):
    def describe(self):
        return rp.describe("acme-sts-py", "0.2.0", [
            rp.key("sts_url", "url", required=True, help="the STS base URL"),
            rp.key("api_key", required=True, secret=True, help="sent as X-Api-Key"),
            rp.key("user", required=True, help="the user sessions are for"),
            rp.key("audience", help="default audience (a request's wins)"),
            rp.key("otp_seed", secret=True, help="sent as X-Acme-Otp"),
            rp.key("timeout_ms", "integer", help="timeout towards the STS (ms, default 10000)"),
        ])

    def get_credentials(self, request):
        url = rp.config.required("sts_url").rstrip("/") + "/sts/session"
        body = {"user": rp.config.required("user")}
        audience = request.audience or rp.config.get("audience")
        if audience:
            body["audience"] = audience
        headers = {"x-api-key": rp.config.required("api_key"),
                   "content-type": "application/json"}
        otp = rp.config.get("otp_seed")
        if otp:
            headers["x-acme-otp"] = otp
        response = rp.http.post(url, headers=headers, body=json.dumps(body),
                                timeout_ms=int(rp.config.get("timeout_ms", "10000")))
        if response.status == 200:
            doc = response.json()
            return rp.headers({"authorization": f"AcmeSession {doc['session']}"},
                              expires_in=int(doc["ttl"]), principal=doc["user"])
        if response.status == 429 or response.status >= 500:
            raise rp.unavailable(f"the STS answered HTTP {response.status}",
                                 retry_after_ms=response.retry_after_ms())
        if response.status in (401, 403):
            raise rp.denied(f"the STS refused the API key (HTTP {response.status})")
        raise rp.misconfigured(f"the STS answered HTTP {response.status}")

    def handle_security_error(self, request, credentials, error):
        if error.retry_after_ms is not None:
            return rp.retry_after(error.retry_after_ms)
        code = rp.param(rp.challenge(error, "AcmeSession"), "error")
        if code == "expired":
            return rp.refresh_and_retry()
        if code == "revoked" or error.kind == rp.SecurityErrorKind.FORBIDDEN:
            return rp.fail()
        return rp.refresh_on_unauthorized(error)
