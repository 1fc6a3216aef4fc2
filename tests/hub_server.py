"""A local stand-in for the Hugging Face Hub's HTTP API: the endpoints `huggingface_hub` (>= 0.20, read from
its source) calls for `create_repo`, `create_branch` and `upload_folder`, so tests push with the real client.

Endpoints served (model repos; REPO is `org/name`, REV a URL-quoted branch name):

- `POST /api/repos/create`                 create a repo (`name`, `organization`, `private` or `visibility`);
                                            409 when it exists, which `create_repo(exist_ok=True)` accepts
- `POST /api/validate-yaml`                README.md front matter check before a commit (parsed with PyYAML)
- `POST /api/models/REPO/branch/BRANCH`    create a branch from main (409 when it exists)
- `POST /api/models/REPO/preupload/REV`    upload mode per file (`lfs` for binary or >= 10 MiB, else
                                            `regular`, as the Hub decides) and the stored file's oid
- `POST /REPO.git/info/lfs/objects/batch`  git LFS batch API: a `basic` upload and a verify action per
                                            object not stored yet
- `PUT  /lfs/OID`                          an LFS object's bytes (rejected unless their sha256 is OID)
- `POST /lfs/verify`                       LFS verify: the object is stored with that size
- `POST /api/models/REPO/commit/REV`       the NDJSON commit: `header`, `file` (base64), `lfsFile` (by
                                            oid), `deletedFile`, `deletedFolder`
- `GET  /api/agent-harnesses`              huggingface_hub 2.x's agent-detection registry (served empty; the
                                            client fetches it once a day, without a token)

Not served: Xet storage (the CAS protocol `huggingface_hub` uses when `hf_xet` is installed). Clients of this
server run with `HF_HUB_DISABLE_XET=1`, the client's own switch back to the LFS protocol above.
Every request but the LFS PUT (a presigned storage URL on the real Hub) and the registry needs
`Authorization: Bearer TOKEN`. Requests for anything else get 404 and are recorded in `FakeHub.unknown`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import yaml

GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data` (the oid the Hub reports for a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool


@dataclass
class FakeHub:
    """What the server holds and saw: repos (branch -> path -> file), LFS objects, commits and requests."""

    token: str
    url: str = ""
    repos: dict[str, dict] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The bytes of every file at the head of `revision`."""
        return {p: f.data for p, f in self.repos[repo_id]["branches"][revision].items()}


class HubError(Exception):
    """An error reply: HTTP status, `{"error": message, **extra}` body and the Hub's X-Error-Code header."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra or {}


def _front_matter(readme: str) -> dict:
    if not readme.startswith("---"):
        return {}
    return yaml.safe_load(readme.split("---", 2)[1]) or {}


def _branch(hub: FakeHub, repo: str, rev: str) -> dict:
    if repo not in hub.repos:
        raise HubError(404, f"Repository not found: {repo}", "RepoNotFound")
    branches = hub.repos[repo]["branches"]
    if rev not in branches:
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
    return branches[rev]


def create_repo(hub: FakeHub, body: dict) -> dict:
    repo = f"{body.get('organization') or 'user'}/{body['name']}"
    if repo in hub.repos:
        raise HubError(409, "You already created this model repo", extra={"url": f"{hub.url}/{repo}"})
    private = body.get("private", body.get("visibility") == "private")
    hub.repos[repo] = {
        "private": bool(private),
        "branches": {"main": {".gitattributes": StoredFile(GITATTRIBUTES, False)}},
    }
    return {"url": f"{hub.url}/{repo}", "name": repo}


def create_branch(hub: FakeHub, repo: str, branch: str, body: dict) -> dict:
    start = dict(_branch(hub, repo, body.get("startingPoint") or "main"))
    branches = hub.repos[repo]["branches"]
    if branch in branches:
        raise HubError(409, f"Reference already exists: {branch}")
    branches[branch] = start
    return {}


def preupload(hub: FakeHub, repo: str, rev: str, body: dict) -> dict:
    files = _branch(hub, repo, rev)
    out = []
    for f in body["files"]:
        binary = b"\0" in base64.b64decode(f["sample"]) or f["size"] >= 10 << 20
        stored = files.get(f["path"])
        oid = None
        if stored is not None:
            oid = hashlib.sha256(stored.data).hexdigest() if stored.lfs else git_blob_oid(stored.data)
        out.append(
            {
                "path": f["path"],
                "uploadMode": "lfs" if binary else "regular",
                "shouldIgnore": False,
                "oid": oid,
            }
        )
    return {"files": out}


def lfs_batch(hub: FakeHub, repo: str, body: dict) -> dict:
    _branch(hub, repo, "main")
    objects = []
    for obj in body["objects"]:
        entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
        if obj["oid"] not in hub.lfs:
            upload = {"href": f"{hub.url}/lfs/{obj['oid']}"}
            entry["actions"] = {"upload": upload, "verify": {"href": f"{hub.url}/lfs/verify"}}
        objects.append(entry)
    return {"transfer": "basic", "objects": objects}


def commit(hub: FakeHub, repo: str, rev: str, body: bytes) -> dict:
    files = _branch(hub, repo, rev)
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    new = dict(files)
    for line in lines[1:]:
        value = line["value"]
        if line["key"] == "file":
            new[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
        elif line["key"] == "lfsFile":
            data = hub.lfs.get(value["oid"])
            if data is None or len(data) != value["size"]:
                raise HubError(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
            new[value["path"]] = StoredFile(data, True)
        elif line["key"] == "deletedFile":
            new.pop(value["path"])
        elif line["key"] == "deletedFolder":
            new = {p: f for p, f in new.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        else:
            raise HubError(400, f"unknown commit operation {line['key']}")
    hub.repos[repo]["branches"][rev] = new
    oid = hashlib.sha1(f"{repo}{rev}{len(hub.commits)}".encode()).hexdigest()
    hub.commits.append({"repo": repo, "revision": rev, "summary": lines[0]["value"]["summary"], "oid": oid})
    return {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", re.compile(r"/api/agent-harnesses"), lambda h, m, b: {"standardEnvVars": [], "harnesses": {}}),
    ("POST", re.compile(r"/api/repos/create"), lambda h, m, b: create_repo(h, json.loads(b))),
    ("POST", re.compile(r"/api/validate-yaml"), lambda h, m, b: validate_yaml(json.loads(b))),
    ("POST", re.compile(rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)"),
     lambda h, m, b: create_branch(h, m["repo"], unquote(m["branch"]), json.loads(b or b"{}"))),
    ("POST", re.compile(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"),
     lambda h, m, b: preupload(h, m["repo"], unquote(m["rev"]), json.loads(b))),
    ("POST", re.compile(rf"/{REPO}\.git/info/lfs/objects/batch"), lambda h, m, b: lfs_batch(h, m["repo"], json.loads(b))),
    ("PUT", re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})"), lambda h, m, b: store_lfs(h, m["oid"], b)),
    ("POST", re.compile(r"/lfs/verify"), lambda h, m, b: verify_lfs(h, json.loads(b))),
    ("POST", re.compile(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"),
     lambda h, m, b: commit(h, m["repo"], unquote(m["rev"]), b)),
]  # fmt: skip


def validate_yaml(body: dict) -> dict:
    try:
        _front_matter(body["content"])
    except yaml.YAMLError as e:
        raise HubError(400, "Invalid metadata") from e
    return {"errors": [], "warnings": []}


def store_lfs(hub: FakeHub, oid: str, data: bytes) -> dict:
    if hashlib.sha256(data).hexdigest() != oid:
        raise HubError(400, "content does not match its oid")
    hub.lfs[oid] = data
    return {}


def verify_lfs(hub: FakeHub, body: dict) -> dict:
    if body["oid"] not in hub.lfs or len(hub.lfs[body["oid"]]) != body["size"]:
        raise HubError(404, f"LFS object {body['oid']} not found")
    return {}


def _find_route(method: str, path: str) -> tuple | None:
    """(match, action) of the route serving `method path`, None when nothing does."""
    for route_method, pattern, action in ROUTES:
        match = pattern.fullmatch(path)
        if route_method == method and match:
            return match, action
    return None


def request_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    """A request's body, chunked (its trailers read past) or of Content-Length."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while size := int(handler.rfile.readline().split(b";")[0], 16):
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        while handler.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
            pass
        return b"".join(chunks)
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _handler(hub: FakeHub) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

        def _body(self) -> bytes:
            return request_body(self)

        def _reply(self, status: int, payload, code: str | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code:
                self.send_header("X-Error-Code", code)
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> None:
            body, path = self._body(), urlsplit(self.path).path
            with hub.lock:
                hub.requests.append(f"{self.command} {path}")
                found = _find_route(self.command, path)
                if found is None:
                    hub.unknown.append(f"{self.command} {path}")
                    return self._reply(404, {"error": f"not served by the test hub: {path}"})
                match, action = found
                public = self.command == "PUT" or path == "/api/agent-harnesses"
                if not public and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials"})
                try:
                    self._reply(200, action(hub, match, body))
                except HubError as e:
                    self._reply(e.status, {"error": str(e), **e.extra}, e.code)

        do_GET = do_POST = do_PUT = _route  # noqa: N815 - the http.server API

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

    return Handler


@contextlib.contextmanager
def serve_hub(token: str) -> Iterator[FakeHub]:
    """Run the stand-in Hub on 127.0.0.1 (a free port) in a thread; yields its state (`url` set)."""
    hub = FakeHub(token=token)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
