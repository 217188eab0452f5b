#!/usr/bin/env python3
"""A Hugging Face Hub on loopback, for the Hub client's tests and benchmark (real sockets, real HTTP).

Serves model repos from directories with the endpoints huggingface_hub and opensci-compat use:
  GET  /api/models/{org}/{name}[/revision/{rev}][?blobs=true]   sha + siblings (size, blobId, lfs)
  GET  /api/models/{org}/{name}/tree/{rev}[?recursive=...]      flat file list (huggingface_hub >= 1.0)
  HEAD|GET /{org}/{name}/resolve/{rev}/{path}   small files: 200 + ETag (git blob sha1); LFS files
        (*.safetensors, *.bin, *.pt): 302 to /storage/{sha256} on --storage-host, X-Linked-Etag,
        X-Linked-Size; every answer carries X-Repo-Commit
  HEAD|GET /storage/{sha256}   Range: bytes=N- / N-M (206); refuses a request carrying
        Authorization (400), as signed storage URLs do

  fake_hub.py --repo org/name=DIR [--repo ...] --port-file F --log F [--faults F] [--token T]
              [--private org/name] [--storage-host 127.0.0.2]

--faults names a JSON file, re-read whenever it changes, holding a list of rules applied in order:
  {"kind": "listing|tree|head|get|storage|any", "path": "substring", "times": N,
   "status": 429, "headers": {"Retry-After": "1"}}      answer with this status instead
  {"kind": "storage", "drop_after": BYTES, "times": 1}   send the headers, BYTES of the body, hang up
  {"kind": "storage", "corrupt": true}                   flip one byte of the body
  {"kind": "storage", "rate": BYTES_PER_S}               send slowly (concurrency tests)
  {"kind": "head", "delay": SECONDS}                     answer late
Every request is logged to --log as one JSON line: kind, method, path, range, status, bytes (of
body sent), auth (an Authorization header came), t0, t1, inflight (requests in flight at start).
"""
import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class Repo:
    def __init__(self, repo_id, root):
        self.id, self.root, self.files = repo_id, root, {}
        for base, _, names in os.walk(root):
            for n in sorted(names):
                full = os.path.join(base, n)
                rel = os.path.relpath(full, root)
                size = os.path.getsize(full)
                sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
                with open(full, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        sha256.update(chunk)
                        sha1.update(chunk)
                self.files[rel] = {"full": full, "size": size, "sha256": sha256.hexdigest(),
                                   "sha1": sha1.hexdigest(), "lfs": rel.endswith(LFS_SUFFIXES)}
        self.commit = hashlib.sha1("".join(f"{p}:{v['sha256']}" for p, v in sorted(self.files.items())).encode()).hexdigest()


class State:
    def __init__(self, args):
        self.repos = {}
        for spec in args.repo:
            rid, _, d = spec.partition("=")
            self.repos[rid] = Repo(rid, d)
        self.by_sha = {f["sha256"]: f for r in self.repos.values() for f in r.files.values()}
        self.args, self.lock = args, threading.Lock()
        self.faults, self.faults_mtime, self.inflight = [], None, 0

    def take_fault(self, kind, path):
        """The first matching fault rule with uses left (its count goes down)."""
        with self.lock:
            f = self.args.faults
            if f and os.path.exists(f):
                m = os.stat(f).st_mtime_ns
                if m != self.faults_mtime:
                    with open(f) as fh:
                        self.faults = json.load(fh)
                    self.faults_mtime = m
            for rule in self.faults:
                if rule.get("kind", "any") not in ("any", kind) or rule.get("path", "") not in path:
                    continue
                if rule.get("times", 1 << 30) <= 0:
                    continue
                rule["times"] = rule.get("times", 1 << 30) - 1
                return rule
        return None

    def log(self, entry):
        with self.lock:
            with open(self.args.log, "a") as f:
                f.write(json.dumps(entry) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-hub/1"

    def log_message(self, *a):
        pass

    def do_HEAD(self):
        self.serve(head=True)

    def do_GET(self):
        self.serve(head=False)

    # --- plumbing ---
    def serve(self, head):
        st = self.server.state
        with st.lock:
            st.inflight += 1
            inflight = st.inflight
        self.entry = {"method": self.command, "path": self.path, "range": self.headers.get("Range"),
                      "auth": self.headers.get("Authorization") is not None, "bytes": 0, "t0": time.time(),
                      "inflight": inflight, "kind": "?", "status": 0}
        try:
            self.route(head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with st.lock:
                st.inflight -= 1
            self.entry["t1"] = time.time()
            st.log(self.entry)

    def reply(self, status, body=b"", headers=None, head=False, ctype="application/json"):
        self.entry["status"] = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self.entry["bytes"] += len(body)

    def error(self, status, code, message, head, extra=None):
        h = {"X-Error-Code": code, "X-Error-Message": message}
        h.update(extra or {})
        self.reply(status, json.dumps({"error": message}).encode(), h, head)

    def fault(self, kind, head):
        rule = self.server.state.take_fault(kind, self.path)
        if rule and "delay" in rule:
            time.sleep(rule["delay"])
        if rule and "status" in rule:
            self.error(rule["status"], "Injected", f"injected {rule['status']}", head, rule.get("headers"))
            return None, True
        return rule, False

    def authorised(self, repo, head):
        a = self.server.state.args
        token = self.headers.get("Authorization", "")
        if repo.id in (a.private or []):
            if not token:
                self.error(401, "RepoNotFound", "Repository not found (or private): authentication required", head)
                return False
            if token != f"Bearer {a.token}":
                self.error(401, "Unauthorized", "Invalid credentials in Authorization header", head)
                return False
        return True

    def route(self, head):
        st = self.server.state
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if parts[:1] == ["storage"] and len(parts) == 2:
            self.entry["kind"] = "storage"
            return self.storage(parts[1], head)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            rid = f"{parts[2]}/{parts[3]}"
            rest = parts[4:]
            kind = "tree" if rest[:1] == ["tree"] else "listing"
            self.entry["kind"] = kind
            _, done = self.fault(kind, head)
            if done:
                return
            repo = st.repos.get(rid)
            if repo is None:
                return self.error(404, "RepoNotFound", f"Repository {rid} not found", head)
            if not self.authorised(repo, head):
                return
            rev = rest[1] if len(rest) >= 2 else "main"
            if rev not in ("main", repo.commit):
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            if kind == "tree":
                items = [{"type": "file", "path": p, "size": f["size"], "oid": f["sha1"],
                          **({"lfs": {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}} if f["lfs"] else {})}
                         for p, f in sorted(repo.files.items())]
                return self.reply(200, json.dumps(items).encode(), head=head)
            blobs = "blobs" in parse_qs(url.query)
            sib = []
            for p, f in sorted(repo.files.items()):
                s = {"rfilename": p}
                if blobs:
                    s.update({"size": f["size"], "blobId": f["sha1"]})
                    if f["lfs"]:
                        s["lfs"] = {"sha256": f["sha256"], "size": f["size"], "pointerSize": 134}
                sib.append(s)
            body = {"id": rid, "modelId": rid, "sha": repo.commit, "private": rid in (st.args.private or []),
                    "siblings": sib}
            return self.reply(200, json.dumps(body).encode(), head=head)
        if len(parts) >= 5 and parts[2] == "resolve":
            self.entry["kind"] = "head" if head else "get"
            _, done = self.fault(self.entry["kind"], head)
            if done:
                return
            rid, rev, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            repo = st.repos.get(rid)
            if repo is None:
                return self.error(404, "RepoNotFound", f"Repository {rid} not found", head)
            if not self.authorised(repo, head):
                return
            if rev not in ("main", repo.commit):
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            f = repo.files.get(path)
            common = {"X-Repo-Commit": repo.commit}
            if f is None:
                return self.error(404, "EntryNotFound", f"{path} does not exist on {rev}", head, common)
            if f["lfs"]:
                host = st.args.storage_host or self.headers.get("Host", "").split(":")[0]
                loc = f"http://{host}:{self.server.server_address[1]}/storage/{f['sha256']}?signature=fake"
                h = dict(common, **{"Location": loc, "X-Linked-Etag": f'"{f["sha256"]}"',
                                    "X-Linked-Size": str(f["size"]), "ETag": f'"{f["sha1"]}"'})
                return self.reply(302, b"", h, head)
            return self.send_file(f, head, dict(common, ETag=f'"{f["sha1"]}"'), None)
        return self.error(404, "NotFound", f"no route {url.path}", head)

    def storage(self, sha, head):
        rule, done = self.fault("storage", head)
        if done:
            return
        if self.headers.get("Authorization"):
            return self.error(400, "AuthOnStorage", "Only one auth mechanism allowed: a signed URL takes no Authorization", head)
        f = self.server.state.by_sha.get(sha)
        if f is None:
            return self.error(404, "NoSuchKey", "no such blob", head)
        return self.send_file(f, head, {"ETag": f'"{sha}"'}, rule)

    def send_file(self, f, head, headers, rule):
        size, begin, end = f["size"], 0, f["size"] - 1
        rng = self.headers.get("Range")
        status = 200
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            begin = int(a)
            end = min(int(b), size - 1) if b else size - 1
            if begin >= size:
                return self.error(416, "RangeNotSatisfiable", "range", head, {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {begin}-{end}/{size}"
        length = end - begin + 1
        self.entry["status"] = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if head:
            return
        self.wfile.flush()
        drop = rule.get("drop_after") if rule else None
        rate = rule.get("rate") if rule else None
        corrupt = bool(rule and rule.get("corrupt"))
        with open(f["full"], "rb") as fh:
            if not (drop or rate or corrupt):
                sent = self.connection.sendfile(fh, offset=begin, count=length)
                self.entry["bytes"] += sent
                return
            fh.seek(begin)
            left = length if drop is None else min(length, drop)
            first = True
            while left > 0:
                chunk = fh.read(min(left, 65536))
                if not chunk:
                    break
                if corrupt and first:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                first = False
                self.wfile.write(chunk)
                self.entry["bytes"] += len(chunk)
                left -= len(chunk)
                if rate:
                    time.sleep(len(chunk) / rate)
        if drop is not None and drop < length:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # hang up mid-file
            self.close_connection = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repo", action="append", required=True)
    p.add_argument("--port-file", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--faults")
    p.add_argument("--token")
    p.add_argument("--private", action="append")
    p.add_argument("--storage-host", help="host name put into storage redirects (e.g. 127.0.0.2: another host)")
    args = p.parse_args()
    state = State(args)
    servers = []
    for host in ["127.0.0.1"] + ([args.storage_host] if args.storage_host and args.storage_host != "127.0.0.1" else []):
        port = servers[0].server_address[1] if servers else 0
        s = ThreadingHTTPServer((host, port), Handler)
        s.daemon_threads = True
        s.state = state
        servers.append(s)
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(servers[0].server_address[1]))
    os.rename(tmp, args.port_file)
    print(f"fake hub on 127.0.0.1:{servers[0].server_address[1]}: " +
          ", ".join(f"{r.id}@{r.commit[:12]} ({len(r.files)} files)" for r in state.repos.values()), file=sys.stderr)
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
