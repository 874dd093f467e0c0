"""The Responses API and embeddings through api-key-server with a JWT, using the official
OpenAI SDK.

A response is stored upstream under the product's one key; the proxy lets only the user
who created it read, continue or delete it (others get 404 `response_not_found`).

Environment:
    PROXY_URL     the proxy, e.g. http://127.0.0.1:8080 (the SDK needs the /v1 suffix,
                  added here)
    PROXY_JWT     the token
    PROXY_MODEL   optional, default gpt-4o-mini
    PROXY_EMBEDDING_MODEL  optional, default text-embedding-3-small
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

    response = client.responses.create(model=model, input="Say hello")
    print(f"plain:    {response.output_text}")
    if expect not in response.output_text.lower():
        print(f"unexpected reply: {response.output_text!r}", file=sys.stderr)
        return 1

    # The creator may read it back and continue it.
    again = client.responses.retrieve(response.id)
    if again.id != response.id:
        print(f"retrieved {again.id!r}, not {response.id!r}", file=sys.stderr)
        return 1
    follow_up = client.responses.create(model=model, input="Say hello again", previous_response_id=response.id)
    print(f"continued: {follow_up.output_text}")

    streamed = ""
    created = None
    for event in client.responses.create(model=model, input="Say hello", stream=True):
        if event.type == "response.created":
            created = event.response.id
        elif event.type == "response.output_text.delta":
            streamed += event.delta
    print(f"streamed: {streamed}")
    if not created or expect not in streamed.lower():
        print(f"unexpected streamed reply: {streamed!r} (id {created!r})", file=sys.stderr)
        return 1
    client.responses.delete(created)

    embedding_model = os.environ.get("PROXY_EMBEDDING_MODEL", "text-embedding-3-small")
    embeddings = client.embeddings.create(model=embedding_model, input=["first text", "second text"])
    sizes = [len(item.embedding) for item in embeddings.data]
    print(f"embeddings: {len(embeddings.data)} vectors of sizes {sizes}")
    if len(embeddings.data) != 2 or not all(sizes):
        print("unexpected embeddings", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
