"""A minimal Hub HTTP API on loopback for push tests: repos, preupload (all files 'regular'), NDJSON commits."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


WRITER = {"type": "user", "name": "user", "orgs": [{"name": "team", "roleInOrg": "write"},
                                                    {"name": "readers", "roleInOrg": "read"}],
          "auth": {"type": "access_token", "accessToken": {"role": "write"}}}
READER = {**WRITER, "auth": {"type": "access_token", "accessToken": {"role": "read"}}}


class FakeHub:
    def __init__(self, fail_commit: bool = False, tokens=None):
        self.tokens = tokens if tokens is not None else {"hf_test": WRITER, "hf_read": READER}  # token -> whoami
        self.repos = {}  # repo_id -> {path: bytes}
        self.commits = []
        self.requests = []
        self.fail_commit = fail_commit
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj=None, headers=None):
                body = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                n = int(self.headers.get("Content-Length", 0) or 0)
                return self.rfile.read(n) if n else b""

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["api", "whoami-v2"]:
                    token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                    if token not in hub.tokens:
                        return self._send(401, {"error": "Invalid credentials in Authorization header"})
                    return self._send(200, hub.tokens[token])
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = "/".join(parts[2:4])
                    if repo in hub.repos:
                        return self._send(200, {"id": repo, "sha": "0" * 40, "siblings": []})
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return self._send(404, {"error": "not found"})

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path))
                self.send_response(404)
                self.end_headers()

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self._body()
                path = self.path.split("?")[0].strip("/").split("/")
                if path == ["api", "validate-yaml"]:
                    return self._send(200, {"errors": [], "warnings": []})
                if path[:3] == ["api", "repos", "create"]:
                    data = json.loads(body)
                    repo = f"{data.get('organization') or 'user'}/{data['name']}" if "/" not in data["name"] else data["name"]
                    if data.get("organization") is None and "/" not in data["name"]:
                        repo = f"user/{data['name']}"
                    if repo in hub.repos:
                        return self._send(409, {"error": "exists"})
                    hub.repos[repo] = {}
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path[:2] == ["api", "models"] and len(path) >= 5 and path[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if path[:2] == ["api", "models"] and len(path) >= 5 and path[4] == "commit":
                    repo = "/".join(path[2:4])
                    if hub.fail_commit:
                        return self._send(400, {"error": "simulated failure"})
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    files = {}
                    for ln in lines:
                        if ln["key"] == "file":
                            files[ln["value"]["path"]] = base64.b64decode(ln["value"]["content"])
                    hub.repos.setdefault(repo, {}).update(files)
                    hub.commits.append((repo, sorted(files)))
                    return self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/" + "1" * 40, "commitOid": "1" * 40,
                                            "success": True})
                return self._send(404, {"error": f"unknown POST {self.path}"})

            def do_DELETE(self):
                hub.requests.append(("DELETE", self.path))
                data = json.loads(self._body() or b"{}")
                repo = f"{data.get('organization') or 'user'}/{data.get('name')}"
                hub.repos.pop(repo, None)
                return self._send(200, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
