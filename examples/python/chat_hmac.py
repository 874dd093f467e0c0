"""Chat completions through api-key-server with HMAC request signatures, using the
official OpenAI SDK.

An httpx event hook signs every request the SDK sends, retries included, each with a
fresh timestamp and nonce: a retried request with the old nonce would be refused as a
replay. The hook signs exactly what goes on the wire: the path without its query and the
body bytes as serialised.

Environment:
    PROXY_URL          the proxy, e.g. http://127.0.0.1:8080
    PROXY_HMAC_CLIENT  the client id (a key of CLIENT_HMAC_SECRETS)
    PROXY_HMAC_SECRET  the client's shared secret (keep it out of source and argv)
    PROXY_PRODUCT      optional, default demo
    PROXY_USER         optional, default example-user
    PROXY_MODEL        optional, default gpt-4o-mini
    PROXY_EXPECT       optional text the replies must contain (used by run-all.sh)

Exits non-zero on any failure.
"""

import hashlib
import hmac
import os
import secrets
import sys
import time

import httpx
from openai import OpenAI


def signer(client_id: str, secret: bytes, product: str, user: str):
    """An httpx request hook that adds the proxy's HMAC headers."""

    def sign(request: httpx.Request) -> None:
        body = request.read()
        # The path as sent (percent-encoded), without the query: what the proxy verifies.
        path = request.url.raw_path.split(b"?", 1)[0].decode("ascii")
        timestamp = str(int(time.time()))
        nonce = secrets.token_urlsafe(24)  # 32 characters of [A-Za-z0-9_-]
        string_to_sign = "\n".join(
            [
                timestamp,
                request.method,
                path,
                client_id,
                product,
                user,
                nonce,
                hashlib.sha256(body).hexdigest(),
            ]
        )
        signature = hmac.new(secret, string_to_sign.encode(), hashlib.sha256).hexdigest()
        # The SDK always sends its api_key as a Bearer token; next to a signature the
        # proxy would refuse the request as ambiguous, so it goes.
        request.headers.pop("Authorization", None)
        request.headers.update(
            {
                "X-Client-Id": client_id,
                "X-Timestamp": timestamp,
                "X-Nonce": nonce,
                "X-Product-Id": product,
                "X-User-Id": user,
                "X-Signature": signature,
            }
        )

    return sign


def main() -> int:
    hook = signer(
        os.environ["PROXY_HMAC_CLIENT"],
        os.environ["PROXY_HMAC_SECRET"].encode(),
        os.environ.get("PROXY_PRODUCT", "demo"),
        os.environ.get("PROXY_USER", "example-user"),
    )
    client = OpenAI(
        base_url=os.environ["PROXY_URL"].rstrip("/") + "/v1",
        api_key="unused-with-hmac",  # the SDK requires one; the hook removes it
        http_client=httpx.Client(event_hooks={"request": [hook]}, timeout=60),
    )
    model = os.environ.get("PROXY_MODEL", "gpt-4o-mini")
    expect = os.environ.get("PROXY_EXPECT", "").lower()
    messages = [{"role": "user", "content": "Say hello"}]

    reply = client.chat.completions.create(model=model, messages=messages)
    text = reply.choices[0].message.content or ""
    print(f"plain:    {text}")
    if not text or expect not in text.lower():
        print(f"unexpected reply: {text!r}", file=sys.stderr)
        return 1

    streamed = ""
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            streamed += chunk.choices[0].delta.content
    print(f"streamed: {streamed}")
    if not streamed or expect not in streamed.lower():
        print(f"unexpected streamed reply: {streamed!r}", file=sys.stderr)
        return 1

    # The models list goes through the same hook (GET, empty body).
    models = [m.id for m in client.models.list()]
    print(f"models:   {', '.join(models)}")
    if model not in models:
        print(f"{model} is not in the proxy's models: {models}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
