#!/usr/bin/env python3
"""A fake Kubernetes API server for reauth's kubectl test: HTTPS on 127.0.0.1
(kubectl sends exec-plugin credentials only over TLS), answering `GET /version`.

Every request's bearer token is appended to --log (one JSON line per request).
Tokens listed in --reject (one per line, re-read per request) get a 401 Status,
as a real API server answers a revoked or expired token.

    server.py --cert cert.pem --key key.pem --log requests.jsonl --reject rejected.txt

Prints the port it listens on as the first line of stdout.
"""
import argparse
import json
import os
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--cert", required=True)
parser.add_argument("--key", required=True)
parser.add_argument("--log", required=True)
parser.add_argument("--reject", required=True)
args = parser.parse_args()


def rejected():
    try:
        with open(args.reject) as f:
            return {line.strip() for line in f if line.strip()}
    except FileNotFoundError:
        return set()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        with open(args.log, "a") as f:
            f.write(json.dumps({"path": self.path, "token": token}) + "\n")
        if token is None or token in rejected():
            body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
            self.reply(401, body)
        elif self.path.split("?")[0] == "/version":
            self.reply(200, {"major": "1", "minor": "20", "gitVersion": "v1.20.2-fake", "platform": "linux/amd64"})
        else:
            self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(args.cert, args.key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
