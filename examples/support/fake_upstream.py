"""A stand-in for OpenAI's chat completions endpoint, for the examples that need an
upstream other than the one `api-key-server dev` brings (a proxy in `serve` mode, or an
upstream that refuses the product's key). Standard library only; binds 127.0.0.1.

    python3 fake_upstream.py            # answers like OpenAI, echoing the prompt
    python3 fake_upstream.py --status 401   # refuses every request as OpenAI does a bad key

Prints `URL=http://127.0.0.1:PORT/v1/chat/completions` once it listens. `GET /requests`
answers `{"chat": N}`, the number of chat requests received so far, so a harness can
count what reached the upstream (an SDK's retries included).
"""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
received = 0


class Handler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        if self.path != "/requests":
            return self.reply(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        with lock:
            self.reply(200, {"chat": received})

    def do_POST(self) -> None:
        global received
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        with lock:
            received += 1
        if self.status != 200:
            error = {"message": "Incorrect API key provided.", "type": "invalid_request_error"}
            return self.reply(self.status, {"error": {**error, "code": "invalid_api_key", "param": None}})
        request = json.loads(body)
        prompt = next((m["content"] for m in reversed(request["messages"]) if m["role"] == "user"), "")
        self.reply(
            200,
            {
                "id": f"chatcmpl-fake{received}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"Hello from the fake upstream! You said: {prompt}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    def reply(self, status: int, value: dict) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass  # quiet: the proxy logs every request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--status", type=int, default=200, help="answer every chat request with this status")
    Handler.status = parser.parse_args().status
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"URL=http://127.0.0.1:{server.server_port}/v1/chat/completions", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
