"""A stand-in for api-key-server with a daily budget, for the budget examples
(examples/python/budget.py, examples/node/budget.js) when no real proxy with a budget is
at hand. Standard library only; binds 127.0.0.1.

    python3 fake_budget_proxy.py [--budget-usd 0.001]

It answers `POST /v1/chat/completions` as the proxy does for one user with a
`DAILY_BUDGET_USD` on `gpt-4o-mini` (input $0.15, output $0.60 per 1M tokens): a request
is admitted only if its worst case fits what is left (input: the body's bytes; output:
`max_tokens`, 2048 when absent), and then costs its usage (1 + 1 tokens here). Every
answer carries `x-budget-limit-usd` and `x-budget-remaining-usd` (what was left before
the request, 6 decimals rounded down); a refusal is 429 `budget_exceeded` (type
`insufficient_quota`) with `x-should-retry: false` and `Retry-After` until the next UTC
midnight. Amounts are integers of 1e-9 USD, as in the proxy. Any bearer token passes.

Prints `URL=http://127.0.0.1:PORT` once it listens.
"""

import argparse
import datetime
import json
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Per token, in 1e-12 USD (micro-USD per 1M tokens), as `MODEL_PRICES` holds them.
INPUT_PRICE = 150_000
OUTPUT_PRICE = 600_000
DEFAULT_MAX_TOKENS = 2048

lock = threading.Lock()
budget = 0  # 1e-9 USD
spent = 0


def cost(input_tokens: int, output_tokens: int) -> int:
    """1e-9 USD, rounded up."""
    return -(-(input_tokens * INPUT_PRICE + output_tokens * OUTPUT_PRICE) // 1000)


def usd_6_down(nanos: int) -> str:
    """Decimal USD, at most 6 decimals, rounded down, no trailing zeros."""
    return format((Decimal(nanos // 1000) / 1_000_000).normalize(), "f")


def seconds_to_utc_midnight() -> int:
    now = datetime.datetime.now(datetime.timezone.utc)
    midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight - now).total_seconds()))


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        global spent
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": "not found", "type": "invalid_request_error"}}, {})
        request = json.loads(body)
        output_limit = max(request.get("max_tokens") or 0, request.get("max_completion_tokens") or 0)
        reservation = cost(len(body), output_limit or DEFAULT_MAX_TOKENS)
        with lock:
            left = max(0, budget - spent)
            admitted = reservation <= left
            if admitted:
                spent += cost(1, 1)
        headers = {"x-budget-limit-usd": usd_6_down(budget), "x-budget-remaining-usd": usd_6_down(left)}
        if not admitted:
            error = {
                "message": "This user's daily budget cannot cover this request; it resets at midnight.",
                "type": "insufficient_quota",
                "code": "budget_exceeded",
                "param": None,
            }
            headers |= {"retry-after": str(seconds_to_utc_midnight()), "x-should-retry": "false"}
            return self.reply(429, {"error": error}, headers)
        prompt = next((m["content"] for m in reversed(request["messages"]) if m["role"] == "user"), "")
        self.reply(
            200,
            {
                "id": "chatcmpl-budget",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"You said: {prompt}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
            headers,
        )

    def reply(self, status: int, payload: dict, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    global budget
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-usd", default="0.001", help="the user's daily budget (at most 6 decimals)")
    args = parser.parse_args()
    budget = int(Decimal(args.budget_usd) * 1_000_000_000)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"URL=http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
