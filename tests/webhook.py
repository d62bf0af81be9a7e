"""A real HTTP server on 127.0.0.1 for the notification tests: it records every POST (path,
headers, body) and answers with the next of a list of status codes (then 200)."""
import http.server
import json
import threading
import time


class Webhook:
    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.posts = []
        self.lock = threading.Lock()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hook.lock:
                    code = hook.statuses.pop(0) if hook.statuses else 200
                    hook.posts.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                       "status": code})
                self.send_response(code)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/hook" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def delivered(self):
        """The JSON bodies answered with a 2xx."""
        with self.lock:
            return [json.loads(p["body"]) for p in self.posts if 200 <= p["status"] < 300]

    def wait_for(self, n, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = self.delivered()
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError("%d of %d notification(s) after %ss: %r" % (len(self.delivered()), n, timeout,
                                                                        self.posts))

    def close(self):
        self.server.shutdown()
        self.server.server_close()
