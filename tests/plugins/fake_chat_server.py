"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions wire format, for
tests: ``reply(messages) -> str`` writes the answers; ``script`` can queue error statuses
(429, 500) that are sent before the next successful answer, ``"garbage"`` (a 200 whose
body is not JSON) or ``"slow"`` (an answer after ``slow_s`` seconds). ``forever`` is sent
for every request once the script is used up (e.g. 429 forever). Replies carry
``usage``: one token per 4 characters of the messages and of the reply (``usage=False``:
none)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeChatServer:
    def __init__(self, reply, script=None, forever=None, usage=True, slow_s=2.0):
        self.reply, self.script = reply, list(script or [])
        self.forever, self.usage, self.slow_s = forever, usage, slow_s
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    status = server.script.pop(0) if server.script else (server.forever or 200)
                if self.path != "/v1/chat/completions":
                    status = 404
                if status == "slow":
                    time.sleep(server.slow_s)
                    status = 200
                if status == "garbage":
                    data = b"<html>Bad gateway"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if status != 200:
                    payload = {"error": {"message": f"fake status {status}"}}
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                else:
                    content = server.reply(body["messages"])
                    payload = {
                        "id": "chatcmpl-test", "object": "chat.completion",
                        "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {
                            "role": "assistant", "content": content}}],
                    }
                    if server.usage:
                        prompt = sum(len(m["content"]) for m in body["messages"]) // 4 + 1
                        done = len(content) // 4 + 1
                        payload["usage"] = {"prompt_tokens": prompt, "completion_tokens": done,
                                            "total_tokens": prompt + done}
                    self.send_response(200)
                data = json.dumps(payload).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
