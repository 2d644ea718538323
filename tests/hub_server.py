"""A local stand-in for the Hugging Face Hub: just enough of its HTTP API for huggingface_hub.

Serves, on 127.0.0.1 at a random port (stdlib `http.server`, one thread per request):
- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}`: model info with `sha`
  and `siblings` (what `repo_info` / older `snapshot_download` read);
- `GET /api/models/{repo}/tree/{rev}[/{path}]`: the file list (`list_repo_files`,
  `list_repo_tree`, newer `snapshot_download`);
- `HEAD`/`GET /{repo}/resolve/{rev}/{file}`: the file, with `ETag` (sha256, as for LFS
  files), `X-Repo-Commit`, `Content-Length`, and byte ranges (resumed downloads).
Errors carry the Hub's `X-Error-Code` header: a gated repo answers file downloads with
401 (no token) or 403 (token, licence not accepted) `GatedRepo`, while its listing stays
public as on the real Hub; unknown repos answer 404 `RepoNotFound`; unknown revisions
`RevisionNotFound`; unknown files `EntryNotFound`.

Every request is recorded in `FakeHub.requests` so tests can see what was downloaded.
`point_huggingface_hub_at(monkeypatch, endpoint, home)` makes an already imported
huggingface_hub use the server and a temporary cache (it reads HF_ENDPOINT / HF_HOME at
import, so the module constants are patched as well as the environment).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    files: Dict[str, bytes]
    gated: bool = False
    sha: str = ""
    accepted_tokens: Tuple[str, ...] = ()

    def __post_init__(self):
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha256(self.files[name]).digest())
            self.sha = digest.hexdigest()


@dataclass
class Request:
    method: str
    path: str
    authorization: Optional[str]
    status: int = 0


@dataclass
class FakeHub:
    repos: Dict[str, FakeRepo] = field(default_factory=dict)
    requests: List[Request] = field(default_factory=list)
    server: Optional[ThreadingHTTPServer] = None
    thread: Optional[threading.Thread] = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(self, repo_id: str, files: Dict[str, bytes], **kw) -> FakeRepo:
        repo = FakeRepo(dict(files), **kw)
        self.repos[repo_id] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, **kw) -> FakeRepo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_repo(repo_id, files, **kw)

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # ---- what the tests look at ----
    def downloads(self, repo_id: Optional[str] = None) -> List[str]:
        """Files served with a successful GET (the actual downloads), as repo paths.

        huggingface_hub skips the GET of a file whose content (ETag) it already holds, e.g.
        tokenizer_2/vocab.json after tokenizer/vocab.json: see `requested` for the HEADs too.
        """
        return self._files(repo_id, lambda r: r.method == "GET" and r.status in (200, 206))

    def requested(self, repo_id: Optional[str] = None) -> List[str]:
        """Files asked about in any way (HEAD or GET, any answer)."""
        return self._files(repo_id, lambda r: True)

    def _files(self, repo_id, keep) -> List[str]:
        out = []
        for r in list(self.requests):
            if "/resolve/" in r.path and keep(r):
                repo, _, rest = r.path.lstrip("/").partition("/resolve/")
                if repo_id is None or repo == repo_id:
                    out.append(unquote(rest.split("/", 1)[1]))
        return out

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()


def _error(code: str, message: str) -> Dict[str, str]:
    return {"X-Error-Code": code, "X-Error-Message": message}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.0"  # one request per connection: stop() really cuts it off

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # ---- plumbing ----
    def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
              content_type: str = "application/json") -> None:  # fmt: skip
        self._record.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _fail(self, status: int, code: str, message: str, extra: Optional[Dict[str, str]] = None) -> None:
        self._json({"error": message}, status, {**_error(code, message), **(extra or {})})

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        path = urlsplit(self.path).path
        self._record = Request(self.command, path, self.headers.get("authorization"))
        with self.fake.lock:
            self.fake.requests.append(self._record)
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2] + "/" + parts[3], parts[4:])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]))
        else:
            self._fail(404, "NotFound", f"no route for {path}")

    def _repo(self, repo_id: str) -> Optional[FakeRepo]:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._fail(404, "RepoNotFound", "Repository not found")
        return repo

    def _revision_ok(self, repo: FakeRepo, revision: str) -> bool:
        if revision in ("main", repo.sha):
            return True
        self._fail(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    # ---- /api/models/... ----
    def _api(self, repo_id: str, rest: List[str]) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            if rest and not self._revision_ok(repo, rest[1]):
                return
            siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.files.items())]
            self._json({
                "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                "lastModified": "2024-10-29T00:00:00.000Z", "siblings": siblings,
            })  # fmt: skip
        elif rest[0] == "tree" and len(rest) >= 2:
            if not self._revision_ok(repo, rest[1]):
                return
            under = "/".join(rest[2:])
            entries = []
            for name, data in sorted(repo.files.items()):
                if under and not name.startswith(under + "/"):
                    continue
                sha256 = hashlib.sha256(data).hexdigest()
                entries.append({
                    "type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name,
                    "lfs": {"oid": sha256, "size": len(data), "pointerSize": 134},
                })  # fmt: skip
            self._json(entries)
        else:
            self._fail(404, "NotFound", f"unsupported API call {rest}")

    # ---- /{repo}/resolve/{rev}/{file} ----
    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._revision_ok(repo, revision):
            return
        if repo.gated:
            auth = self.headers.get("authorization")
            if not auth:
                self._fail(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                           "access to it and be authenticated to access it. Please log in.")  # fmt: skip
                return
            if auth.removeprefix("Bearer ").strip() not in repo.accepted_tokens:
                self._fail(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are "
                           "not in the authorized list.")  # fmt: skip
                return
        data = repo.files.get(filename)
        common = {"X-Repo-Commit": repo.sha}
        if data is None:
            self._fail(404, "EntryNotFound", f"{filename} does not exist on main", common)
            return
        headers = {**common, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        start = 0
        status = 200
        rng = self.headers.get("range")
        if rng and rng.startswith("bytes=") and self.command == "GET":
            first, _, last = rng[len("bytes="):].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data = data[start:end]
        headers["Content-Length"] = str(len(data))
        self._send(status, data, headers, "application/octet-stream")


def point_huggingface_hub_at(monkeypatch, endpoint: str, home: Path, offline: bool = False) -> None:
    """Route huggingface_hub to `endpoint` with its cache and token under `home`.

    huggingface_hub reads these variables once, at import: set them for subprocesses and
    patch the module constants for this process.
    """
    import huggingface_hub.constants as c

    home = Path(home)
    env = {
        "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1",
    }  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER"):
        monkeypatch.delenv(k, raising=False)
    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": offline,
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_PROGRESS_BARS": True,
    }
    for name, value in patches.items():
        if hasattr(c, name):
            monkeypatch.setattr(c, name, value)


def set_offline(monkeypatch, offline: bool) -> None:
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", offline)
