"""A small in-memory Hugging Face Hub API server for offline push / download tests.

It implements just enough of the Hub's HTTP API for the *real* ``huggingface_hub`` client (and therefore diffusers'
``push_to_hub`` / ``from_pretrained``) to work against it:

- ``POST /api/repos/create``                                   create a repo (409 if it exists)
- ``POST /api/validate-yaml``                                  model-card metadata check (always valid)
- ``POST /api/models/{repo}/preupload/{rev}``                  every file is uploaded in "regular" mode (no LFS/xet)
- ``POST /api/models/{repo}/commit/{rev}``                     NDJSON commit; base64 file contents stored in memory
- ``GET  /api/models/{repo}[/revision/{rev}]``                 ``model_info`` / ``repo_info`` with ``siblings``
- ``GET  /api/models/{repo}/tree/{rev}[/{path}]``              ``list_repo_tree`` (``recursive`` honoured)
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``                    file metadata and download

Errors carry the ``X-Error-Code`` header that the client maps to ``RepositoryNotFoundError`` /
``RevisionNotFoundError`` / ``EntryNotFoundError``. Every request is appended to ``server.requests`` so a test can
check what the client did. The client must see ``HF_ENDPOINT=server.url`` *before* ``huggingface_hub`` is imported
(the endpoint is bound at import time), and ``HF_HUB_DISABLE_XET=1``.

Usage::

    with LocalHub() as hub:
        env = hub.client_env(tmp_path)   # HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET, offline flags off
        subprocess.run([...], env=env)
        hub.files("user/repo")           # {path: bytes} at the head of main
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    """A repo: its commits, newest last; each commit maps path -> bytes."""

    def __init__(self, repo_id: str, private: bool):
        self.repo_id = repo_id
        self.private = private
        self.commits: list[tuple[str, str, dict[str, bytes]]] = []  # (sha, message, files)

    def resolve(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        if not self.commits:
            return ("0" * 40, {}) if rev == "main" else None
        if rev == "main":
            sha, _, files = self.commits[-1]
            return sha, files
        for sha, _, files in self.commits:
            if sha == rev:
                return sha, files
        return None


class LocalHub:
    """Run the fake Hub in a background thread on 127.0.0.1 (a free port); use as a context manager."""

    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def client_env(self, home: str | os.PathLike) -> dict[str, str]:
        """Environment for a client process: this endpoint, a private HF_HOME, no xet, offline flags off."""
        env = dict(os.environ)
        for key in (
            "HF_HUB_OFFLINE",
            "HF_DATASETS_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
        ):
            env.pop(key, None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(home),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
            HF_HUB_ETAG_TIMEOUT="30",
            HF_HUB_DOWNLOAD_TIMEOUT="30",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        return env

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """The repo's files at ``rev`` (a copy)."""
        with self._lock:
            resolved = self.repos[repo_id].resolve(rev)
        if resolved is None:
            raise KeyError(f"{repo_id}@{rev}")
        return dict(resolved[1])

    def commit_messages(self, repo_id: str) -> list[str]:
        with self._lock:
            return [message for _, message, _ in self.repos[repo_id].commits]


class _Handler(BaseHTTPRequestHandler):
    server_state: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # ---------------------------------------------------------------------------------------------- plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, head: bool = False, headers: dict[str, str] | None = None):
        self._send(status, json.dumps(payload).encode(), headers=headers, head=head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False):
        headers = {"X-Error-Code": code} if code else {}
        headers["X-Error-Message"] = message
        self._json(status, {"error": message}, head=head, headers=headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        state = self.server_state
        state.requests.append((method, path))
        for pattern, handler in _ROUTES:
            if handler.__name__.split("_")[0] != method.lower() and not (
                method == "HEAD" and handler.__name__.startswith("get_")
            ):
                continue
            match = re.fullmatch(pattern, path)
            if match:
                return handler(self, query=query, head=method == "HEAD", **match.groupdict())
        self._error(404, None, f"no route for {method} {path}", head=method == "HEAD")

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    # ---------------------------------------------------------------------------------------------- helpers
    def _repo(self, repo: str, head: bool = False) -> _Repo | None:
        found = self.server_state.repos.get(repo)
        if found is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.", head=head)
        return found

    def _resolve(self, repo: str, rev: str, head: bool = False):
        found = self._repo(repo, head)
        if found is None:
            return None
        with self.server_state._lock:
            resolved = found.resolve(rev)
        if resolved is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
        return resolved

    def _info(self, repo: str, rev: str = "main", head: bool = False, **_):
        resolved = self._resolve(repo, rev, head)
        if resolved is None:
            return
        sha, files = resolved
        self._json(
            200,
            {
                "_id": repo,
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": sha,
                "private": self.server_state.repos[repo].private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(files)],
            },
            head=head,
        )

    # ---------------------------------------------------------------------------------------------- routes
    def post_create(self, query, head, **_):
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") != "model":
            return self._error(400, None, "only model repos are supported by this test server")
        name, org = payload["name"], payload.get("organization")
        repo_id = f"{org}/{name}" if org else f"user/{name}"
        state = self.server_state
        with state._lock:
            if repo_id in state.repos:
                return self._error(409, None, "You already created this model repo")
            state.repos[repo_id] = _Repo(repo_id, payload.get("visibility") == "private" or payload.get("private"))
        self._json(200, {"url": f"{state.url}/{repo_id}", "name": repo_id})

    def post_validate(self, query, head, **_):
        self._body()
        self._json(200, {"errors": [], "warnings": []})

    def post_preupload(self, query, head, repo, rev, **_):
        payload = json.loads(self._body() or b"{}")
        if self._repo(repo) is None:
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
        self._json(200, {"files": files, "commitOid": None})

    def post_commit(self, query, head, repo, rev, **_):
        raw = self._body()
        found = self._repo(repo)
        if found is None:
            return
        state = self.server_state
        with state._lock:
            resolved = found.resolve(rev)
            if resolved is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = dict(resolved[1])
            message = ""
            for line in raw.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        return self._error(400, None, f"unsupported encoding {value.get('encoding')!r}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                else:  # lfsFile / copies never happen: preupload answers "regular"
                    return self._error(400, None, f"unsupported commit operation {key!r}")
            sha = hashlib.sha1(f"{repo}:{len(found.commits)}:{message}".encode() + repr(sorted(files)).encode())
            found.commits.append((sha.hexdigest(), message, files))
            sha = sha.hexdigest()
        self._json(200, {"commitUrl": f"{state.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def get_info(self, query, head, repo, **_):
        self._info(repo, "main", head)

    def get_info_rev(self, query, head, repo, rev, **_):
        self._info(repo, rev, head)

    def get_tree(self, query, head, repo, rev, sub=None, **_):
        resolved = self._resolve(repo, rev, head)
        if resolved is None:
            return
        _, files = resolved
        prefix = (sub.strip("/") + "/") if sub else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            data = files[path]
            entries.append({"type": "file", "path": path, "size": len(data), "oid": _git_blob_sha(data)})
        entries += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
        self._json(200, entries, head=head)

    def get_resolve(self, query, head, repo, rev, path, **_):
        resolved = self._resolve(repo, rev, head)
        if resolved is None:
            return
        sha, files = resolved
        if path not in files:
            return self._error(404, "EntryNotFound", f"Entry not found: {path}", head=head)
        data = files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
            "ETag": f'"{_git_blob_sha(data)}"',
            "Content-Length": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        ranged = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", ranged or "")
        if match and not head:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            part = data[start : end + 1]
            headers.update({"Content-Length": str(len(part)), "Content-Range": f"bytes {start}-{end}/{len(data)}"})
            return self._send(206, part, headers=headers)
        self._send(200, data, headers=headers, head=head)


_ROUTES = [
    (r"/api/repos/create", _Handler.post_create),
    (r"/api/validate-yaml", _Handler.post_validate),
    (rf"/api/models/{_REPO}/preupload/{_REV}", _Handler.post_preupload),
    (rf"/api/models/{_REPO}/commit/{_REV}", _Handler.post_commit),
    (rf"/api/models/{_REPO}/revision/{_REV}", _Handler.get_info_rev),
    (rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<sub>.*))?", _Handler.get_tree),
    (rf"/api/models/{_REPO}", _Handler.get_info),
    (rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", _Handler.get_resolve),
]
