"""A product's backend that hands its desktop app short-lived proxy tokens.

The backend is the only place that holds the JWT signing key (the proxy holds just the
public half, in JWT_PUBLIC_KEYS). A desktop app signs in to its backend as it already
does, then asks it for a proxy token:

    POST /token    Authorization: Bearer <the app's session token>
    -> 200 {"token": "<RS256 JWT, sub = the session's user, product = this product>"}

The user id comes from the session the backend authenticated, never from the request:
whoever could choose it could spend any user's limits. Tokens are minted with
`api-key-server mint-jwt` (RS256, header kid, claims sub/product/iat/exp), which shows
the logic; a real backend does the same with its JWT library.

    python3 product_backend.py --key private.pem --kid backend-1 [--product demo] [--ttl 60]

Prints `URL=http://127.0.0.1:PORT` once it listens (127.0.0.1 only: this is a demo).
Environment: API_KEY_SERVER_BIN, the binary (default: api-key-server on PATH).
"""

import argparse
import json
import os
import subprocess
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The demo's sign-in: session token -> user id. A real backend looks the session up in
# its own store.
SESSIONS = {"demo-session-of-user-42": "user-42"}


def make_handler(args: argparse.Namespace) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/token":
                return self.reply(404, {"error": "not found"})
            session = self.headers.get("Authorization", "").removeprefix("Bearer ")
            user = SESSIONS.get(session)
            if user is None:
                return self.reply(401, {"error": "sign in first"})
            minted = subprocess.run(
                [
                    os.environ.get("API_KEY_SERVER_BIN", "api-key-server"),
                    "mint-jwt",
                    *("--key", args.key, "--kid", args.kid),
                    *("--product", args.product, "--user", user, "--ttl", str(args.ttl)),
                ],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if minted.returncode != 0:
                self.log_error("mint-jwt failed: %s", minted.stderr.strip())
                return self.reply(500, {"error": "cannot mint a token"})
            self.reply(200, {"token": minted.stdout.strip()})

        def reply(self, status: int, value: dict) -> None:
            data = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")  # a credential
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass  # tokens are credentials: keep request lines out of the log

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="A product backend that mints proxy tokens.")
    parser.add_argument("--key", required=True, help="the RSA private key PEM file")
    parser.add_argument("--kid", required=True, help="the key's name in the proxy's JWT_PUBLIC_KEYS")
    parser.add_argument("--product", default="demo")
    parser.add_argument("--ttl", type=int, default=60, help="token lifetime in seconds")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(args))
    print(f"URL=http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
