#!/usr/bin/env python3
"""A made-up company STS and the resource server behind it (not OAuth2), for
the contract 0.2 tests and the `acme-sts` example provider.

    python3 sts.py

Listens on 127.0.0.1 (an ephemeral port, printed as `{"port": N}` on stdout). Python's
http.server is strict on purpose: a request body must come with Content-Length
(a chunked body is answered 400, and counted).

STS:  POST /sts/session   X-Api-Key: <key>, JSON {"user": ..., "audience": ...}
      -> 200 {"session": "...", "ttl": <s>, "user": ...}
      -> 401 {"error": "bad api key", "echo": {<request headers>}}  (a sloppy STS
         that echoes what it was sent: the provider must not leak it)
      -> 429 + Retry-After when told to (POST /admin {"mode": "429", ...})
Resource server: GET /api/whoami  Authorization: AcmeSession <session>
      -> 200 {"user": ...}
      -> 401 WWW-Authenticate: AcmeSession error="expired" (past its ttl)
      -> 401 WWW-Authenticate: AcmeSession error="revoked" (POST /admin revoke)
      -> 403 (session for another audience than "api")
Admin: POST /admin {"mode": "ok"|"429"|"down", "retry_after": "2", "ttl": 30,
       "revoke": true}; GET /stats -> {"sessions", "chunked", "rejected_429",
       "last_content_length"}.
"""

import json
import secrets
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_KEY = "acme-key-7f3a9c"
state = {"mode": "ok", "retry_after": "2", "ttl": 30, "sessions": 0, "chunked": 0,
         "rejected_429": 0, "last_content_length": None}
sessions = {}  # session -> {"user", "audience", "expires", "revoked"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=None, headers=()):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            state["chunked"] += 1
            self.close_connection = True
            return None
        length = self.headers.get("content-length")
        state["last_content_length"] = length
        if length is None:
            return None
        return self.rfile.read(int(length))

    def do_GET(self):
        if self.path == "/stats":
            return self.reply(200, {k: state[k] for k in
                                    ("sessions", "chunked", "rejected_429", "last_content_length")})
        if self.path == "/api/whoami":
            auth = self.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            s = sessions.get(token) if scheme == "AcmeSession" else None
            challenge = 'AcmeSession realm="acme", error="%s"'
            if s is None:
                return self.reply(401, {"error": "no session"},
                                  [("www-authenticate", 'AcmeSession realm="acme"')])
            if s["revoked"]:
                return self.reply(401, {"error": "revoked"},
                                  [("www-authenticate", challenge % "revoked")])
            if time.time() >= s["expires"]:
                return self.reply(401, {"error": "expired"},
                                  [("www-authenticate", challenge % "expired")])
            if s["audience"] != "api":
                return self.reply(403, {"error": "wrong audience"})
            return self.reply(200, {"user": s["user"]})
        self.reply(404, {"error": "not found"})

    def do_POST(self):
        raw = self.body()
        if raw is None:
            return self.reply(400, {"error": "a body needs Content-Length"})
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            return self.reply(400, {"error": "not JSON"})
        if self.path == "/admin":
            for k in ("mode", "retry_after", "ttl"):
                if k in doc:
                    state[k] = doc[k]
            if doc.get("revoke"):
                for s in sessions.values():
                    s["revoked"] = True
            return self.reply(200, {"ok": True})
        if self.path != "/sts/session":
            return self.reply(404, {"error": "not found"})
        if state["mode"] == "429":
            state["rejected_429"] += 1
            return self.reply(429, {"error": "slow down"},
                              [("retry-after", str(state["retry_after"]))])
        if state["mode"] == "down":
            return self.reply(503, {"error": "down"})
        if self.headers.get("x-api-key") != API_KEY:
            return self.reply(401, {"error": "bad api key", "echo": dict(self.headers.items())})
        user = doc.get("user")
        if not isinstance(user, str) or not user:
            return self.reply(400, {"error": "user is required"})
        session = secrets.token_urlsafe(24)
        ttl = int(state["ttl"])
        sessions[session] = {"user": user, "audience": doc.get("audience") or "api",
                             "expires": time.time() + ttl, "revoked": False}
        state["sessions"] += 1
        self.reply(200, {"session": session, "ttl": ttl, "user": user})


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
