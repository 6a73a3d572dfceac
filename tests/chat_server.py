"""A scripted OpenAI-compatible /v1/chat/completions server on 127.0.0.1, for tests."""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """`behave(call)` returns (status, body, headers, delay) or None for the default answer.
    `answer(content)` gives the default answer text for a request's user message."""

    def __init__(self, answer, behave=None):
        self.answer, self.behave = answer, behave or (lambda call: None)
        self.calls, self.lock = [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                with server.lock:
                    call = {"n": len(server.calls) + 1, "content": content, "body": body,
                            "auth": self.headers.get("Authorization", "")}
                    server.calls.append(call)
                scripted = server.behave(call)
                if scripted is None:
                    reply = {"choices": [{"message": {"role": "assistant", "content": server.answer(content)},
                                          "finish_reason": "stop"}]}
                    scripted = (200, json.dumps(reply), {}, 0)
                status, text, headers, delay = scripted
                time.sleep(delay)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(text.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def instruction_of(content: str) -> str:
    """The instruction inside one of agentwrite's prompts (both put it under "Request:")."""
    m = re.search(r"Request:\n(.*?)\n\n", content, re.S)
    return m.group(1) if m else ""


def step_of(content: str) -> str:
    """"plan" for agentwrite's plan call, "pK" for the call that writes paragraph K."""
    m = re.search(r"Now write paragraph (\d+) of", content)
    return f"p{m.group(1)}" if m else "plan"
