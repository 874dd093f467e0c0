"""What an app shows its user when api-key-server refuses a request on a daily budget
(429 `budget_exceeded`, type `insufficient_quota`), with the official OpenAI SDK.

- The SDK does not retry it: it retries a 429 by default, but the proxy sends
  `x-should-retry: false` and the SDK obeys that header. So `max_retries` can stay at
  its default (2): other 429s (`rate_limit_exceeded`) are still retried, this one is not.
- The app tells the user when the budget comes back: `Retry-After` counts the seconds
  until the next midnight in the proxy's `DAY_TIMEZONE`.
- The proxy admits a request only if its worst case fits what is left (the body's size
  plus `max_tokens` of output): near the end of a budget a short request may pass while a
  long one is refused. Asking for fewer tokens is what the user can do today.
- While under budget, `x-budget-limit-usd` and `x-budget-remaining-usd` come with every
  answer (`with_raw_response` reads them).

Environment:
    PROXY_BUDGET_URL, PROXY_BUDGET_JWT
        a proxy whose user has a daily budget
        that fits a request with max_tokens=16 but not one with max_tokens=2048
        (DAILY_BUDGET_USD=0.001 with gpt-4o-mini at $0.15/$0.60 per 1M tokens)

Exits non-zero on any failure.
"""

import datetime
import os
import sys

import httpx
import openai
from openai import OpenAI

MESSAGES = [{"role": "user", "content": "Say hello"}]


def budget_message(error: openai.APIStatusError) -> str | None:
    """The sentence to show the user for a budget refusal; `None` for any other error."""
    if error.code != "budget_exceeded":
        return None
    seconds = int(error.response.headers.get("retry-after", "0"))
    wait = -(-seconds // 60)  # whole minutes, rounded up: never sooner than the proxy said
    hours, minutes = divmod(wait, 60)
    back = datetime.datetime.now().astimezone() + datetime.timedelta(minutes=wait)
    return (
        f"You have used today's AI allowance for requests this long. Try a shorter one, "
        f"or come back in {hours} h {minutes:02d} min (at {back:%H:%M} your time)."
    )


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {what}")


def main() -> int:
    attempts: list[httpx.Request] = []
    sdk = OpenAI(
        base_url=os.environ["PROXY_BUDGET_URL"].rstrip("/") + "/v1",
        api_key=os.environ["PROXY_BUDGET_JWT"],
        timeout=30,  # max_retries stays at the SDK's default (2): see the docstring
        http_client=httpx.Client(event_hooks={"request": [attempts.append]}),
    )

    # A short request fits: the answer says how much of the budget was left before it.
    raw = sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=16)
    reply = raw.parse()
    limit = raw.headers.get("x-budget-limit-usd")
    remaining = raw.headers.get("x-budget-remaining-usd")
    check(bool(reply.choices[0].message.content), "no reply to the short request")
    check(limit is not None and remaining is not None, "no x-budget-* headers on the answer")
    print(f"short request answered; budget ${limit}, ${remaining} left before it")

    # A long one's worst case does not fit: refused, and not retried.
    attempts.clear()
    try:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2048)
        check(False, "a request beyond the budget was admitted")
    except openai.RateLimitError as error:
        message = budget_message(error)
        check(message is not None, f"refused with {error.code!r}, not budget_exceeded")
        check(error.type == "insufficient_quota", f"type {error.type!r}")
        check(error.response.headers.get("x-should-retry") == "false", "x-should-retry is not false")
        check(int(error.response.headers["retry-after"]) >= 1, "no Retry-After")
        check(len(attempts) == 1, f"budget_exceeded was retried: {len(attempts)} attempts")
        print(f"429 budget_exceeded, 1 attempt; the app shows: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
