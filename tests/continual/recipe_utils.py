"""Helpers of the recipe tests: small variants of recipes/tiny_cpu.yaml and a local stand-in for the Hub API.

:class:`FakeHub` is a small ``http.server`` on 127.0.0.1 that answers the huggingface_hub calls a push makes
(whoami, create repo, create branch, preupload, commit) and records every request. It stands in for the Hugging Face
Hub because the test machines have no network: the upload code runs unchanged against ``HfApi(endpoint=<its url>)``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import torch
import yaml

from gere_hf.continual.recipe import apply_overrides

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = os.path.join(REPO_ROOT, "recipes")
TINY_RECIPE = os.path.join(RECIPES, "tiny_cpu.yaml")

# Smaller than the shipped tiny recipe: tests run many of these.
SMALL = (
    "training.max_steps=2",
    "stages.0.num_train=8",
    "stages.0.num_eval=4",
    "stages.1.num_train=8",
    "stages.1.num_eval=4",
    "evaluation.general_texts=4",
    "gere.replay_num_samples=8",
)


def tiny_recipe(output_dir, *overrides: str, small: bool = True) -> dict:
    """The shipped tiny recipe as a mapping, writing to ``output_dir``, with ``key=value`` overrides applied."""
    with open(TINY_RECIPE, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data["output_dir"] = str(output_dir)
    return apply_overrides(data, (*(SMALL if small else ()), *overrides))


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread, the more so on a shared CPU; restore the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def crash_in_stage(monkeypatch, trainer_class, stage_folder: str, step: int) -> None:
    """Make ``trainer_class.training_step`` raise KeyboardInterrupt (an interruption) at global step ``step`` of the
    stage whose output folder contains ``stage_folder``; every other step trains as usual."""
    original = trainer_class.training_step

    def crash(self, *args, **kwargs):
        if stage_folder in self.args.output_dir and self.state.global_step == step:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "training_step", crash)


def record_steps(monkeypatch, trainer_class) -> list:
    """Record ``(stage folder, step number)`` for every training step ``trainer_class`` takes from now on."""
    trained = []
    original = trainer_class.training_step

    def record(self, *args, **kwargs):
        trained.append((os.path.basename(os.path.dirname(self.args.output_dir)), self.state.global_step + 1))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "training_step", record)
    return trained


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def all_text_under(folder: str) -> str:
    """Every file under ``folder`` decoded leniently, concatenated (to look for leaked secrets)."""
    chunks = []
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                chunks.append(f.read().decode("utf-8", "replace"))
    return "\n".join(chunks)


class FakeHub:
    """A local stand-in for the Hugging Face Hub API (no network on the test machines).

    ``repos[repo_id]`` is ``{"private": bool, "branches": {name: {path: bytes}}}``; ``requests`` lists
    ``(method, path)`` of every call; ``auth_headers`` the Authorization headers seen (to check the token is sent).
    """

    def __init__(self, token: str = "hf_fake_secret_token_123", user: str = "tester"):
        self.token = token
        self.user = user
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, payload: dict | None = None):
                body = json.dumps(payload or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self, method: str):
                path = urlparse(self.path).path
                hub.requests.append((method, path))
                body = self._body() if method in ("POST", "PUT") else b""
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                parts = [unquote(p) for p in path.strip("/").split("/")]
                if method == "GET" and path == "/api/whoami-v2":
                    return self._reply(200, {"type": "user", "name": hub.user, "fullname": "Test User", "orgs": [],
                                             "auth": {"accessToken": {"displayName": "t", "role": "write"}}})
                if method == "POST" and path == "/api/repos/create":
                    data = json.loads(body or b"{}")
                    repo_id = f"{data.get('organization') or hub.user}/{data['name']}"
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": repo_id})
                    private = data.get("visibility", "private" if data.get("private") else "public") == "private"
                    hub.repos[repo_id] = {"private": private, "branches": {"main": {}}}
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if method == "POST" and path == "/api/validate-yaml":
                    return self._reply(200, {})
                if method == "POST" and len(parts) >= 5 and parts[:2] == ["api", "models"]:
                    repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._reply(404, {"error": f"Repository {repo_id} not found"})
                    if action == "branch":
                        if rest in repo["branches"]:
                            return self._reply(409, {"error": f"Branch {rest} already exists"})
                        repo["branches"][rest] = dict(repo["branches"]["main"])
                        return self._reply(200, {})
                    if action == "preupload":
                        files = json.loads(body or b"{}").get("files", [])
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        return self._commit(repo_id, repo, rest or "main", body)
                hub.unhandled.append((method, path))
                return self._reply(404, {"error": f"fake hub: no handler for {method} {path}"})

            def _commit(self, repo_id, repo, revision, body):
                if revision not in repo["branches"]:
                    return self._reply(404, {"error": f"Revision {revision} not found"})
                header, files = {}, {}
                for line in body.splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item["key"] == "header":
                        header = item["value"]
                    elif item["key"] == "file":
                        value = item["value"]
                        content = value["content"]
                        files[value["path"]] = base64.b64decode(content) if value.get("encoding") == "base64" \
                            else content.encode()
                repo["branches"][revision].update(files)
                oid = f"{len(hub.commits) + 1:040x}"
                hub.commits.append({"repo_id": repo_id, "revision": revision, "summary": header.get("summary"),
                                    "files": sorted(files)})
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                         "pullRequestUrl": None})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
