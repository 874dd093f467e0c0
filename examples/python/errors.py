"""How the official OpenAI SDK behaves on api-key-server's errors, checked for real.

The proxy answers in OpenAI's error envelope and tells the SDK whether to retry
(`x-should-retry`) and when (`Retry-After`), so the SDK's own retry loop does the right
thing with no client code:

- a bad token: `openai.AuthenticationError` (401), not retried;
- `rate_limit_exceeded`: `openai.RateLimitError` with the wait in `Retry-After`; with
  retries on, the SDK waits that long and the retry succeeds;
- `daily_quota_exceeded`: `openai.RateLimitError`, not retried (`x-should-retry: false`;
  waiting until midnight would hang the app);
- `upstream_auth_failed` (OpenAI refused the product's key): `openai.InternalServerError`
  (502), not retried: retrying cannot fix a key.

Attempts are counted by an httpx request hook, so SDK retries show up.

Environment:
    PROXY_URL                       any proxy, for the bad-token case
    PROXY_LIMITED_URL, PROXY_LIMITED_JWT
        a proxy with RATE_LIMIT_CAPACITY=1, RATE_LIMIT_REFILL_PER_SECOND=0.5 and
        DAILY_QUOTA=2, whose token's user has not used it yet
    PROXY_BADKEY_URL, PROXY_BADKEY_JWT
        a proxy whose upstream answers 401
    PROXY_BADKEY_UPSTREAM_REQUESTS  that upstream's request counter (GET: {"chat": N})

Exits non-zero on any failure.
"""

import json
import os
import sys
import time
import urllib.request

import httpx
import openai
from openai import OpenAI

MESSAGES = [{"role": "user", "content": "Say hello"}]


class Attempts:
    """Every HTTP exchange of the SDK, retries included: when it was sent, and the
    Retry-After that came back."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.times: list[float] = []
        self.retry_after: list[str | None] = []

    def sent(self, request: httpx.Request) -> None:
        self.times.append(time.monotonic())

    def answered(self, response: httpx.Response) -> None:
        self.retry_after.append(response.headers.get("retry-after"))


def client(url: str, token: str, attempts: Attempts) -> OpenAI:
    return OpenAI(
        base_url=url.rstrip("/") + "/v1",
        api_key=token,
        timeout=30,  # max_retries stays at the SDK's default (2)
        http_client=httpx.Client(event_hooks={"request": [attempts.sent], "response": [attempts.answered]}),
    )


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {what}")


def bad_token() -> None:
    attempts = Attempts()
    try:
        client(os.environ["PROXY_URL"], "not-a-valid-token", attempts).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        check(False, "a bad token was accepted")
    except openai.AuthenticationError as error:
        check(error.code == "invalid_token", f"code {error.code!r}")
        check(len(attempts.times) == 1, f"401 was retried: {len(attempts.times)} attempts")
        print(f"401 AuthenticationError code={error.code} request_id={error.request_id}, 1 attempt")


def rate_limits() -> None:
    attempts = Attempts()
    sdk = client(os.environ["PROXY_LIMITED_URL"], os.environ["PROXY_LIMITED_JWT"], attempts)
    sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # takes the one token

    # Retries off: the 429 reaches the app, which can read how long to wait.
    try:
        sdk.with_options(max_retries=0).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        check(False, "the empty bucket admitted a request")
    except openai.RateLimitError as error:
        retry_after = int(error.response.headers["retry-after"])
        check(error.code == "rate_limit_exceeded", f"code {error.code!r}")
        check(1 <= retry_after <= 2, f"Retry-After {retry_after} (refill 0.5/s: at most 2)")
        print(f"429 RateLimitError code={error.code} Retry-After={retry_after}s")

    # Retries on (the default): the SDK waits Retry-After, then the retry gets the new token.
    attempts.reset()
    reply = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    check(bool(reply.choices[0].message.content), "no reply after the retry")
    check(len(attempts.times) == 2, f"{len(attempts.times)} attempts, expected 1 refusal + 1 retry")
    waited = attempts.times[1] - attempts.times[0]
    asked = float(attempts.retry_after[0] or 0)
    check(asked >= 1 and waited >= asked - 0.1, f"retried after {waited:.2f}s; Retry-After was {asked}")
    print(f"429 rate_limit_exceeded: the SDK retried once after {waited:.1f}s and got a reply")

    # The daily quota (2) is used up: refused, and not retried despite max_retries=2.
    attempts.reset()
    try:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        check(False, "the used-up quota admitted a request")
    except openai.RateLimitError as error:
        check(error.code == "daily_quota_exceeded", f"code {error.code!r}")
        check(error.response.headers.get("x-should-retry") == "false", "x-should-retry is not false")
        check(len(attempts.times) == 1, f"daily_quota_exceeded was retried: {len(attempts.times)} attempts")
        print(f"429 daily_quota_exceeded: not retried, Retry-After={error.response.headers['retry-after']}s")


def upstream_auth_failed() -> None:
    def upstream_requests() -> int:
        with urllib.request.urlopen(os.environ["PROXY_BADKEY_UPSTREAM_REQUESTS"], timeout=5) as response:
            return json.load(response)["chat"]

    before = upstream_requests()
    attempts = Attempts()
    try:
        client(os.environ["PROXY_BADKEY_URL"], os.environ["PROXY_BADKEY_JWT"], attempts).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        check(False, "the upstream's 401 came back as a success")
    except openai.InternalServerError as error:
        check(error.status_code == 502 and error.code == "upstream_auth_failed", f"{error.status_code} {error.code}")
        check(len(attempts.times) == 1, f"upstream_auth_failed was retried: {len(attempts.times)} attempts")
        check(upstream_requests() - before == 1, "the upstream did not see exactly one request")
        print("502 InternalServerError code=upstream_auth_failed: not retried, 1 upstream request")


def main() -> int:
    bad_token()
    rate_limits()
    upstream_auth_failed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
