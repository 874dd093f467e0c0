"""A desktop app that calls OpenAI through api-key-server with short-lived tokens from its
product's backend, refreshed before they expire.

The app holds neither the OpenAI key nor a JWT signing key: anything shipped in a
desktop binary can be extracted, and a signing key would let its finder mint tokens for
any user. It holds only its user's session with the product backend
(`product_backend.py`), which mints a proxy token per request of the app.

`ProxyToken` is passed as the SDK's `api_key`: the SDK calls it before every request
(retries included), and it answers from its cache until the token has less than
`margin` seconds left, then fetches a new one.

Environment:
    PROXY_URL                the proxy, e.g. http://127.0.0.1:8080
    BACKEND_URL              the product backend, e.g. http://127.0.0.1:9000
    BACKEND_SESSION          the app's session token with its backend
    REFRESH_MARGIN_SECONDS   optional, default 30: refresh when less than this is left
    PROXY_MODEL              optional, default gpt-4o-mini
    PROXY_EXPECT             optional text the replies must contain (used by run-all.sh)

Makes two calls on one token, waits until that token is within the margin of its `exp`,
then makes a third call, which must use a fresh token. With a 60 s token and the default
margin that wait is about half a minute. Exits non-zero on any failure.
"""

import base64
import json
import os
import sys
import threading
import time
import urllib.request

from openai import OpenAI


class ProxyToken:
    """The app's current proxy token, fetched from the product backend when needed."""

    def __init__(self, backend_url: str, session: str, margin: float = 30):
        self.backend_url = backend_url.rstrip("/")
        self.session = session
        self.margin = margin
        self.fetches = 0
        self.token = ""
        self.exp = 0.0
        self._lock = threading.Lock()  # one fetch at a time, whatever the threads

    def __call__(self) -> str:
        with self._lock:
            if time.time() > self.exp - self.margin:
                self.token, self.exp = self._fetch()
                self.fetches += 1
            return self.token

    def _fetch(self) -> tuple[str, float]:
        request = urllib.request.Request(
            f"{self.backend_url}/token",
            method="POST",
            headers={"Authorization": f"Bearer {self.session}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            token = json.load(response)["token"]
        # The app reads exp from the token's payload to know when to refresh; it need not
        # verify the signature: the proxy does.
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return token, float(claims["exp"])


def main() -> int:
    tokens = ProxyToken(
        os.environ["BACKEND_URL"],
        os.environ["BACKEND_SESSION"],
        margin=float(os.environ.get("REFRESH_MARGIN_SECONDS", "30")),
    )
    client = OpenAI(base_url=os.environ["PROXY_URL"].rstrip("/") + "/v1", api_key=tokens, timeout=60)
    model = os.environ.get("PROXY_MODEL", "gpt-4o-mini")
    expect = os.environ.get("PROXY_EXPECT", "").lower()

    def ask(n: int) -> str:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}])
        text = reply.choices[0].message.content or ""
        print(f"call {n}: {text} (token fetches so far: {tokens.fetches})")
        if not text or expect not in text.lower():
            raise SystemExit(f"unexpected reply: {text!r}")
        return tokens.token

    first = ask(1)
    if ask(2) != first or tokens.fetches != 1:
        print(f"the second call should reuse the first token; fetches: {tokens.fetches}", file=sys.stderr)
        return 1
    wait = tokens.exp - tokens.margin - time.time() + 0.5
    print(f"waiting {max(wait, 0):.1f} s until the token is within {tokens.margin:g} s of its exp")
    time.sleep(max(wait, 0))
    if ask(3) == first or tokens.fetches != 2:
        print(f"the third call should use a fresh token; fetches: {tokens.fetches}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
