"""Chat completions through api-key-server with a JWT, using the official OpenAI SDK.

The app never holds the OpenAI key: it sends a short-lived token (minted by your backend,
or by `api-key-server mint-jwt`) as the SDK's `api_key`, and the proxy adds the product's
key upstream.

Environment:
    PROXY_URL     the proxy, e.g. http://127.0.0.1:8080 (the SDK needs the /v1 suffix,
                  added here)
    PROXY_JWT     the token
    PROXY_MODEL   optional, default gpt-4o-mini
    PROXY_EXPECT  optional text the replies must contain (used by run-all.sh)

Exits non-zero on any failure.
"""

import os
import sys

from openai import OpenAI


def main() -> int:
    client = OpenAI(
        base_url=os.environ["PROXY_URL"].rstrip("/") + "/v1",
        api_key=os.environ["PROXY_JWT"],
        timeout=60,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
