#!/usr/bin/env python3
"""Capture worker: a fork server that imports torch and transformers once and runs each capture
in a fresh child forked from that pristine state.

Started by the harness (harness/src/capture_worker.cpp) inside one environment, exactly like a
capture (same interpreter, same environment variables except the private per-run directories),
detached from the harness (own session, output to its log file). It listens on a Unix socket
only once its imports are done, so "connectable" means "ready". Protocol (one connection per
request, newline-terminated JSON; file descriptors travel as SCM_RIGHTS with the request):

  worker -> client  {"event": "hello", "protocol", "key", "pid", "started_at", "captures_served",
                     "usable", "unusable_reason"}
  client -> worker  {"op": "capture", "argv": [script, args...], "env": {...complete...},
                     "cwd", "mounts": [target paths]}  + fds [stdout, stderr, one open_tree(2)
                     detached mount per target]
  worker -> client  {"event": "started", "pid", "pgid", ...}   then later
                    {"event": "exited", "exit_code" | "signal", "strays_killed",
                     "fork_to_exit_seconds", "clean_start": {...}}
                    or {"event": "rejected", "reason"} (nothing was started)
  client -> worker  {"op": "kill", "signal": 15|9}   (the client enforces its timeout)
  client -> worker  {"op": "status"} / {"op": "stop"}

The child of a capture, in order: its own session and process group; PR_SET_PDEATHSIG(SIGKILL)
so it dies with the worker; (rootfs environments) a private mount namespace into which the
client's detached mounts are attached at their host paths, so each capture sees its own model,
token and output directories and nothing of the others'; stdin /dev/null, stdout/stderr on the
client's files; the capture's complete environment; import-time paths that still name the
worker's private directories (HF_MODULES_CACHE, HF_HOME, ... read by transformers and
huggingface_hub at import) rewritten to the capture's; a check that the inherited interpreter
state is the pristine one the worker recorded after its imports (no transformers_modules.*, no
shim markers, no changed transformers globals; the result goes to the client and into the
capture's provenance, and a dirty state refuses to run); then the script as `python script
args...` would run it (runpy, __name__ == "__main__", sys.argv, sys.path[0]).

When the client's connection closes before the child ended (the harness died), the child's
whole process group is killed. Whatever is left of the group when the child ends is killed
before the exit is reported. The worker exits after --idle seconds without a connection, on
SIGTERM/SIGINT and on {"op": "stop"}; running captures are killed then.

Standard library only (ctypes for prctl, unshare and move_mount).
"""

import argparse
import array  # noqa: F401 - imported lazily by socket.recv_fds: before the pristine state is recorded
import atexit
import ctypes
import datetime
import fcntl
import importlib
import importlib.util
import json
import os
import pathlib
import re
import resource
import runpy
import selectors
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
import types
import warnings

PROTOCOL = 1

# Imported once by the worker when installed. Only libraries: a cold capture imports all of
# them too (torch, transformers and what `from_pretrained` needs before any model code runs);
# the harness's own modules (capture, hf_load, shims) are never imported here, so each child
# reads them fresh and an edit to them takes effect at once.
DEFAULT_PREIMPORTS = (
    "numpy",
    "torch",
    "safetensors",
    "safetensors.torch",
    "transformers",
    "transformers.utils",
    "transformers.utils.generic",
    "transformers.modeling_utils",
    "transformers.modeling_outputs",
    "transformers.modeling_rope_utils",
    "transformers.dynamic_module_utils",
    "transformers.models.auto.configuration_auto",
    "transformers.models.auto.modeling_auto",
)

# Environment variables naming the per-run private directories: the worker's are placeholders
# that do not exist (but its TMPDIR, a private empty dir); each capture brings its own.
PRIVATE_KEYS = ("HOME", "TMPDIR", "HF_HOME", "HF_MODULES_CACHE", "XDG_CACHE_HOME")

CLONE_NEWNS = 0x00020000
PR_SET_PDEATHSIG = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
SYS_MOVE_MOUNT = 429  # the same number on every architecture (asm-generic unistd since 5.2)

EXIT_UNCLEAN = 97  # the child found a state that is not the worker's pristine one
EXIT_SETUP = 125  # the child could not set the capture up (mounts, streams); the script never ran

_libc = ctypes.CDLL(None, use_errno=True)


def _now_utc():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def log(text):
    sys.stderr.write(f"[worker {os.getpid()} {_now_utc()}] {text}\n")
    sys.stderr.flush()


# --- the pristine state ------------------------------------------------------------------------


class Pristine:
    """What the worker's interpreter looks like right after its imports, and where import-time
    constants hold the worker's private directories."""

    def __init__(self, private_dirs):
        self.modules = set(sys.modules)
        self.private_dirs = private_dirs  # key -> the worker's placeholder path
        self.globals = _watched_globals()
        self.path_locations = _find_private_paths(private_dirs)


def _watched_globals():
    """The transformers globals a shim or remote code is known to change: names in
    transformers.utils / .utils.generic (kwargs aliases), ROPE_INIT_FUNCTIONS entries, the class
    attributes of PreTrainedModel and the config base class (wrapped methods, class defaults)."""
    out = {}
    for name in ("transformers.utils", "transformers.utils.generic"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = {k: id(v) for k, v in vars(mod).items()}
    rope = sys.modules.get("transformers.modeling_rope_utils")
    table = getattr(rope, "ROPE_INIT_FUNCTIONS", None)
    if isinstance(table, dict):
        out["ROPE_INIT_FUNCTIONS"] = {k: id(v) for k, v in table.items()}
    tf = sys.modules.get("transformers.modeling_utils")
    if tf is not None and hasattr(tf, "PreTrainedModel"):
        out["PreTrainedModel"] = {k: id(v) for k, v in vars(tf.PreTrainedModel).items()}
    cfg = sys.modules.get("transformers.configuration_utils")
    for cls_name in ("PreTrainedConfig", "PretrainedConfig"):
        cls = getattr(cfg, cls_name, None) if cfg is not None else None
        if isinstance(cls, type):
            out[cls_name] = {k: id(v) for k, v in vars(cls).items()}
            break
    return out


def _is_stdlib(name):
    top = name.split(".")[0]
    names = getattr(sys, "stdlib_module_names", None)  # Python >= 3.10
    if names is not None:
        return top in names
    module = sys.modules.get(top)
    where = getattr(module, "__file__", None)
    return where is None or where.startswith(sysconfig.get_paths()["stdlib"])


def _mentions(value, dirs):
    if isinstance(value, pathlib.PurePath):
        value = str(value)
    return isinstance(value, str) and any(value == d or value.startswith(d + os.sep) for d in dirs)


def _find_private_paths(private_dirs):
    """(module name, attribute) of every module-level str/Path that names a private directory
    (e.g. transformers.dynamic_module_utils.HF_MODULES_CACHE, huggingface_hub.constants.HF_HOME),
    plus function defaults holding one (module, function, index)."""
    dirs = tuple(private_dirs.values())
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod_name, mod in list(sys.modules.items()):
            namespace = getattr(mod, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                if _mentions(value, dirs):
                    found.append((mod_name, attr, None))
                elif isinstance(value, types.FunctionType) and value.__defaults__:
                    for i, default in enumerate(value.__defaults__):
                        if _mentions(default, dirs):
                            found.append((mod_name, attr, i))
    return found


def _rebase(value, mapping):
    text = str(value)
    for old, new in mapping:
        if text == old or text.startswith(old + os.sep):
            text = new + text[len(old):]
            break
    return type(value)(text) if isinstance(value, pathlib.PurePath) else text


def private_mapping(pristine, env):
    """(worker dir, capture dir) pairs, longest worker path first (HF_MODULES_CACHE lies under
    HF_HOME)."""
    return sorted(((pristine.private_dirs[k], env[k]) for k in pristine.private_dirs if k in env),
                  key=lambda kv: -len(kv[0]))


def rebase_private_paths(pristine, env):
    """Rewrites the recorded import-time paths from the worker's private dirs to the capture's.
    Returns how many."""
    mapping = private_mapping(pristine, env)
    count = 0
    for mod_name, attr, index in pristine.path_locations:
        mod = sys.modules.get(mod_name)
        if mod is None:
            continue
        if index is None:
            setattr(mod, attr, _rebase(getattr(mod, attr), mapping))
        else:
            fn = getattr(mod, attr)
            defaults = list(fn.__defaults__)
            defaults[index] = _rebase(defaults[index], mapping)
            fn.__defaults__ = tuple(defaults)
        count += 1
    return count


def clean_start_report(pristine):
    """What a child inherited that is not the worker's pristine state. Empty lists = clean."""
    modules = set(sys.modules)
    remote = sorted(m for m in modules if m == "transformers_modules" or m.startswith("transformers_modules."))
    markers = []
    for name in ("shims", "hf_load", "capture"):
        if name in modules:
            markers.append(f"module '{name}' imported before the capture started")
    now = _watched_globals()
    for scope, before in pristine.globals.items():
        after = now.get(scope, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                state = "added" if key not in before else "removed" if key not in after else "replaced"
                markers.append(f"{scope}.{key} {state}")
    for scope in ("PreTrainedModel", "PreTrainedConfig", "PretrainedConfig"):
        tf = sys.modules.get("transformers")
        cls = getattr(tf, scope, None) if tf is not None else None
        if isinstance(cls, type):
            for key, value in vars(cls).items():
                if getattr(value, "_opensci_shim", False):
                    markers.append(f"{scope}.{key} is a shim wrapper")
    extra = sorted(modules - pristine.modules - set(remote) - {"opensci_capture_worker"})
    # A standard-library module imported lazily by the worker's own loop (e.g. `array` by
    # socket.recv_fds) is harmless; anything else imported after the pristine state is not.
    foreign = [m for m in extra if not _is_stdlib(m)]
    return {
        "clean": not remote and not markers and not foreign,
        "transformers_modules": remote,
        "shim_markers": markers,
        "modules_not_in_pristine_worker": extra[:50],
    }


# --- the worker --------------------------------------------------------------------------------


class Capture:
    def __init__(self, conn, pid, pidfd, report_fd, argv):
        self.conn = conn
        self.pid = pid
        self.pidfd = pidfd
        self.report_fd = report_fd
        self.report = b""
        self.argv = argv
        self.forked = time.monotonic()
        self.client_gone = False


class Worker:
    def __init__(self, args):
        self.args = args
        self.started_at = _now_utc()
        self.t0 = time.monotonic()
        self.served = 0
        self.captures = {}  # pid -> Capture
        self.buffers = {}  # conn -> bytes received so far
        self.fds = {}  # conn -> fds received with the request
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.last_activity = time.monotonic()
        self.import_warnings = []
        self.import_errors = {}
        self.preimported = []
        self.import_seconds = 0.0
        self.listener = None
        self.socket_ino = None
        self.pid = os.getpid()
        self.pristine = None
        self.startup_environ = dict(os.environ)
        self.import_environ_changes = {}  # what the imports did to os.environ (None = removed)

    # -- start-up

    def preimport(self, names):
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name in names:
                top = name.split(".")[0]
                try:
                    if importlib.util.find_spec(top) is None:
                        continue  # not installed here: nothing to pre-import
                except (ImportError, ValueError):
                    continue
                try:
                    importlib.import_module(name)
                    self.preimported.append(name)
                except ModuleNotFoundError as e:
                    if e.name == name:  # a submodule this version does not have
                        continue
                    self.import_errors[name] = f"{type(e).__name__}: {e}"
                except BaseException as e:  # noqa: BLE001 - anything: this worker must not serve
                    self.import_errors[name] = f"{type(e).__name__}: {e}"
        self.import_warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
        self.import_seconds = time.perf_counter() - t0
        # A cold capture's imports would make the same changes to its environment.
        now = dict(os.environ)
        self.import_environ_changes = {k: now.get(k) for k in set(now) | set(self.startup_environ)
                                       if now.get(k) != self.startup_environ.get(k)}

    def pollute_for_test(self, shim_names, script_dir):
        """Test only (its own worker key): applies shims in the worker itself after the pristine
        state was recorded, so that the children's clean-start check has something to find."""
        sys.path.insert(0, script_dir)
        import shims  # noqa: PLC0415

        shims.apply_shims(shim_names, "pre-load")
        sys.path.remove(script_dir)

    def listen(self, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address, dir_fd = _unix_address(path)
        try:
            sock.bind(address)  # the client removed a stale socket file under the start lock
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        sock.listen(64)
        sock.setblocking(False)
        self.socket_ino = os.stat(path).st_ino
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, ("listen", None))

    # -- leaving

    def _remove_own_socket(self):
        try:
            if os.stat(self.args.socket).st_ino == self.socket_ino:
                os.unlink(self.args.socket)
        except FileNotFoundError:
            pass
        try:
            with open(self.args.info, encoding="utf-8") as f:
                if json.load(f).get("pid") == os.getpid():
                    os.unlink(self.args.info)
        except (OSError, ValueError):
            pass

    def retire(self):
        """Idle: stop accepting under the start lock, so that no client is left connecting to a
        worker on its way out (a client that finds no socket takes the lock and starts a new
        worker). Connections already queued are still served; then the loop ends."""
        lock_fd = os.open(self.args.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self._remove_own_socket()
            self._accept()
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
        finally:
            os.close(lock_fd)
        log(f"idle for {self.args.idle:.0f} s: retired")

    def remove_private_tmp(self):
        """Its private TMPDIR (<key>.tmp next to the socket) goes with it, under the start lock
        and only while no successor listens (a client creates that dir under the same lock right
        before it starts a new worker of this key)."""
        tmp = self.startup_environ.get("TMPDIR", "")
        if os.path.basename(tmp) != self.args.key + ".tmp" or os.path.dirname(tmp) != os.path.dirname(self.args.socket):
            return
        lock_fd = os.open(self.args.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if not os.path.exists(self.args.socket):
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(lock_fd)

    def shutdown(self, why):
        self._remove_own_socket()
        running = list(self.captures.values())
        for cap in running:
            _killpg(cap.pid, signal.SIGKILL)
        for cap in running:
            try:
                os.waitpid(cap.pid, 0)
            except ChildProcessError:
                pass
        log(f"{why}: stopped ({len(running)} running capture(s) killed)")

    # -- main loop

    def run(self):
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.sel.register(wake_r, selectors.EVENT_READ, ("wake", None))
        self.wake = (wake_r, wake_w)
        while True:
            if self.stopping:
                self.shutdown("stop requested")
                return
            idle_left = self.args.idle - (time.monotonic() - self.last_activity)
            if self.listener is not None and not self.captures and not self.buffers and idle_left <= 0:
                self.retire()
                if not self.buffers and not self.captures:
                    return
            if self.listener is None and not self.captures and not self.buffers:
                return
            timeout = max(0.05, min(idle_left, 5.0)) if self.listener is not None else 0.5
            for key, _ in self.sel.select(timeout):
                kind, obj = key.data
                if kind == "listen":
                    self._accept()
                elif kind == "wake":
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                elif kind == "conn":
                    self._readable(obj)
                elif kind == "pidfd":
                    self._child_ended(obj)
                elif kind == "report":
                    self._report_readable(obj)

    def _on_signal(self, signum, _frame):
        self.stopping = True

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.last_activity = time.monotonic()
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            peer_uid = int.from_bytes(creds[4:8], sys.byteorder)
            if peer_uid not in (0, os.getuid()):
                conn.close()
                continue
            conn.setblocking(False)
            self.buffers[conn] = b""
            self.fds[conn] = []
            self.sel.register(conn, selectors.EVENT_READ, ("conn", conn))
            self._send(conn, {"event": "hello", **self.status()})

    def status(self):
        return {
            "protocol": PROTOCOL,
            "key": self.args.key,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime_seconds": round(time.monotonic() - self.t0, 3),
            "captures_served": self.served,
            "running": len(self.captures),
            "import_seconds": round(self.import_seconds, 3),
            "preimported": self.preimported,
            "usable": not self.import_errors,
            "unusable_reason": "; ".join(f"import {k} failed in the worker: {v}" for k, v in self.import_errors.items()),
            "python": sys.executable,
        }

    def _send(self, conn, message):
        data = (json.dumps(message) + "\n").encode()
        try:
            conn.setblocking(True)
            conn.sendall(data)
            conn.setblocking(False)
            return True
        except OSError:
            return False

    def _readable(self, conn):
        try:
            data, fds, _flags, _ = socket.recv_fds(conn, 1 << 20, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        self.fds[conn] += fds
        if not data:
            self._conn_closed(conn)
            return
        self.buffers[conn] += data
        while b"\n" in self.buffers.get(conn, b""):
            line, rest = self.buffers[conn].split(b"\n", 1)
            self.buffers[conn] = rest
            try:
                message = json.loads(line)
            except ValueError:
                self._send(conn, {"event": "rejected", "reason": "request is not JSON"})
                self._drop(conn)
                return
            self._handle(conn, message)
            if conn not in self.buffers:
                return

    def _capture_of(self, conn):
        for cap in self.captures.values():
            if cap.conn is conn:
                return cap
        return None

    def _handle(self, conn, message):
        op = message.get("op")
        if op == "status":
            self._send(conn, {"event": "status", **self.status()})
        elif op == "stop":
            self._send(conn, {"event": "stopping", "pid": os.getpid()})
            self.stopping = True
        elif op == "kill":
            cap = self._capture_of(conn)
            if cap is not None and not cap.client_gone:
                _killpg(cap.pid, int(message.get("signal", signal.SIGKILL)))
        elif op == "capture":
            if self._capture_of(conn) is not None:
                self._send(conn, {"event": "rejected", "reason": "one capture per connection"})
                return
            self._start_capture(conn, message)
        else:
            self._send(conn, {"event": "rejected", "reason": f"unknown op {op!r}"})

    def _start_capture(self, conn, request):
        fds, self.fds[conn] = self.fds[conn], []
        reason = self._check_request(request, fds)
        if reason:
            for fd in fds:
                os.close(fd)
            self._send(conn, {"event": "rejected", "reason": reason})
            return
        self.served += 1
        cpu0 = _self_cpu()
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(report_r)
                self._child(conn, request, fds, report_w)
            except BaseException:  # noqa: BLE001 - the child must never return into the loop
                try:
                    traceback.print_exc()
                    sys.stderr.flush()
                finally:
                    os._exit(EXIT_SETUP)
            os._exit(EXIT_SETUP)
        os.close(report_w)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        cap = Capture(conn, pid, pidfd, report_r, request["argv"])
        cap.worker_cpu = _self_cpu() - cpu0
        self.captures[pid] = cap
        self.sel.register(pidfd, selectors.EVENT_READ, ("pidfd", cap))
        os.set_blocking(report_r, False)
        self.sel.register(report_r, selectors.EVENT_READ, ("report", cap))
        self._send(conn, {"event": "started", "pid": pid, "pgid": pid, "worker_pid": os.getpid(),
                          "worker_started_at": self.started_at, "captures_served": self.served,
                          "worker_uptime_seconds": round(time.monotonic() - self.t0, 3)})

    def _check_request(self, request, fds):
        argv, env, mounts = request.get("argv"), request.get("env"), request.get("mounts", [])
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            return "argv must be a non-empty list of strings"
        if not isinstance(env, dict):
            return "env must be an object"
        missing = [k for k in PRIVATE_KEYS if k not in env and k in self.args.private_keys]
        if missing:
            return f"env lacks the private directories {missing}"
        # The capture's environment must be the worker's but for the private directories: the
        # libraries read it at import, so anything else would silently change what a cell means.
        own = {k: v for k, v in self.startup_environ.items() if k not in PRIVATE_KEYS}
        theirs = {k: v for k, v in env.items() if k not in PRIVATE_KEYS}
        if own != theirs:
            diff = sorted(k for k in set(own) | set(theirs) if own.get(k) != theirs.get(k))
            return f"environment differs from the worker's in {diff}"
        if len(fds) != 2 + len(mounts):
            return f"expected {2 + len(mounts)} file descriptors (stdout, stderr, mounts), got {len(fds)}"
        if mounts and not self.args.mount_ns:
            return "mounts requested from a worker without --mount-ns"
        return ""

    def _conn_closed(self, conn):
        cap = self._capture_of(conn)
        if cap is not None:
            # The harness went away mid-capture: the capture goes with it, as a cold one would
            # (PR_SET_PDEATHSIG there). Its leader is unreaped, so its group id is still ours.
            cap.client_gone = True
            _killpg(cap.pid, signal.SIGKILL)
            log(f"client of capture {cap.pid} disconnected; killed its process group")
        self._drop(conn)

    def _drop(self, conn):
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        for fd in self.fds.pop(conn, []):
            os.close(fd)
        self.buffers.pop(conn, None)
        conn.close()
        self.last_activity = time.monotonic()

    def _report_readable(self, cap):
        try:
            chunk = os.read(cap.report_fd, 65536)
        except BlockingIOError:
            return
        if chunk:
            cap.report += chunk
            return
        self.sel.unregister(cap.report_fd)
        os.close(cap.report_fd)
        cap.report_fd = None

    def _child_ended(self, cap):
        # The leader ended; it stays a zombie until reaped below, so its pid keeps the group id
        # reserved while the rest of the group is killed.
        cpu0 = _self_cpu()
        self.sel.unregister(cap.pidfd)
        strays = _group_members(cap.pid, exclude=cap.pid)
        if strays:
            _killpg(cap.pid, signal.SIGKILL)
            deadline = time.monotonic() + 2.0
            while _group_members(cap.pid, exclude=cap.pid) and time.monotonic() < deadline:
                time.sleep(0.005)
        _, status, usage = os.wait4(cap.pid, 0)
        os.close(cap.pidfd)
        elapsed = time.monotonic() - cap.forked
        if cap.report_fd is not None:  # what the child wrote before it exited is in the pipe
            try:
                while chunk := os.read(cap.report_fd, 65536):
                    cap.report += chunk
            except OSError:  # BlockingIOError: a forked grandchild still holds the write end
                pass
            self.sel.unregister(cap.report_fd)
            os.close(cap.report_fd)
            cap.report_fd = None
        report, learned = {}, []
        for line in cap.report.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                report.setdefault("unreadable", line.decode(errors="replace")[:500])
                continue
            if "learned_patterns" in item:
                learned = item["learned_patterns"]
            else:
                report.update(item)
        del self.captures[cap.pid]
        message = {"event": "exited", "pid": cap.pid, "strays_killed": len(strays),
                   "fork_to_exit_seconds": round(elapsed, 4),
                   "child_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 4),
                   # the worker's own share: the fork and this bookkeeping
                   "worker_cpu_seconds": round(cap.worker_cpu + _self_cpu() - cpu0, 4),
                   "clean_start": report.get("clean_start"),
                   "child_report": report}
        if os.WIFEXITED(status):
            message["exit_code"] = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            message["signal"] = os.WTERMSIG(status)
        if not cap.client_gone:
            self._send(cap.conn, message)
            self._drop(cap.conn)
        self._learn(learned)
        self.last_activity = time.monotonic()

    def _learn(self, patterns):
        for item in patterns:
            try:
                pattern, flags = item
                if isinstance(pattern, str) and isinstance(flags, int):
                    re.compile(pattern, flags)
            except (re.error, TypeError, ValueError, OverflowError, RecursionError):
                pass

    # -- the child

    def _child(self, conn, request, fds, report_w):
        os.setsid()
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.pid:
            os._exit(EXIT_SETUP)  # the worker died between fork and prctl
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # Nothing of the worker's own descriptors survives into the capture.
        self.sel.close()
        self.listener.close()
        for other in list(self.buffers):
            other.close()
        for pending in self.fds.values():  # descriptors sent with other clients' requests
            for fd in pending:
                os.close(fd)
        for cap in self.captures.values():
            for fd in (cap.pidfd, cap.report_fd):
                if fd is not None:
                    os.close(fd)
        os.close(self.wake[0])
        os.close(self.wake[1])
        out_fd, err_fd, tree_fds = fds[0], fds[1], fds[2:]
        # The capture's streams first: a failure below (exit EXIT_SETUP) is in its stderr.log.
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (null, out_fd, err_fd):
            if fd > 2:
                os.close(fd)
        if request.get("mounts"):
            # A mount namespace of its own: the capture's directories appear at their host
            # paths for this child only, and vanish with it.
            if _libc.unshare(CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
            for target, tree in zip(request["mounts"], tree_fds):
                os.makedirs(target, exist_ok=True)
                if _libc.syscall(SYS_MOVE_MOUNT, tree, b"", -100, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"move_mount onto {target}: {os.strerror(err)}")
                os.close(tree)
        os.chdir(request.get("cwd") or request["env"].get("HOME", "/"))
        # The state inherited from the worker, checked before this child changes anything of it.
        clean = clean_start_report(self.pristine)
        env = request["env"]
        os.environ.clear()
        os.environ.update(env)
        mapping = private_mapping(self.pristine, env)
        applied = {}
        for key, value in self.import_environ_changes.items():
            if key in PRIVATE_KEYS:
                continue
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = _rebase(value, mapping)
            applied[key] = os.environ.get(key)
        rebased = rebase_private_paths(self.pristine, env)
        tempfile.tempdir = None  # re-read TMPDIR
        dmu = sys.modules.get("transformers.dynamic_module_utils")
        context = {
            "mode": "worker",
            "worker_pid": os.getppid(),
            "worker_started_at": self.started_at,
            "worker_key": self.args.key,
            "captures_served": self.served,
            "import_seconds": round(self.import_seconds, 3),
            "preimported": self.preimported,
            "forked_at": _now_utc(),
            "private_paths_rebased": rebased,
            "modules_cache": getattr(dmu, "HF_MODULES_CACHE", None),
            "clean_start": clean,
            "import_warnings": self.import_warnings,
            "import_environ_changes": applied,  # as this child has them (rewritten to its dirs)
        }
        report = os.fdopen(report_w, "w")
        report.write(json.dumps({"clean_start": clean, "modules_cache": context["modules_cache"]}) + "\n")
        report.flush()
        if not clean["clean"]:
            sys.stderr.write("opensci capture worker: the inherited interpreter state is not the pristine one; "
                             f"refusing to run: {json.dumps(clean)}\n")
            sys.stderr.flush()
            os._exit(EXIT_UNCLEAN)
        context_module = types.ModuleType("opensci_capture_worker")
        context_module.context = context
        sys.modules["opensci_capture_worker"] = context_module
        _run_script(request["argv"], report, set(re._cache))  # noqa: SLF001


def _learned_patterns(known):
    """The regular expressions this child compiled that the worker had not: re's own cache keys
    (str patterns with their flags). The worker compiles them into its cache, so the next child
    finds them there (transformers 5.x compiles ~470 weight-renaming patterns per from_pretrained;
    a compiled pattern depends on nothing but the pattern and its flags)."""
    out = []
    for key in list(re._cache):  # noqa: SLF001
        if key in known or len(key) != 3 or key[0] is not str or not isinstance(key[2], int):
            continue
        out.append([key[1], key[2]])
    return out[:2048]


def _run_script(argv, report, known_patterns):
    """Runs argv[0] like `python argv[0] argv[1:]` would, then exits the process the way the
    interpreter would (non-daemon threads joined, atexit handlers run, streams flushed)."""
    script = argv[0]
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            sys.stderr.write(f"{e.code}\n")
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException as e:  # noqa: BLE001 - reported as the interpreter would
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next  # drop the worker's and runpy's frames
        traceback.print_exception(type(e), e, tb or e.__traceback__)
        code = 1
    finally:
        try:
            threading._shutdown()  # noqa: SLF001 - what the interpreter does at exit
        except Exception:  # noqa: BLE001
            pass
        try:
            atexit._run_exitfuncs()  # noqa: SLF001
        except Exception:  # noqa: BLE001
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        try:
            report.write(json.dumps({"learned_patterns": _learned_patterns(known_patterns)}) + "\n")
            report.close()
        except Exception:  # noqa: BLE001 - a lost report costs speed only
            pass
    os._exit(code & 0xFF)


def _self_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_members(pgid, exclude=None):
    """Live (non-zombie) pids whose process group is pgid, from /proc."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == exclude:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                line = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = line[line.rfind(")") + 2:].split()
        if len(rest) >= 3 and int(rest[2]) == pgid and rest[0] not in ("Z", "X"):
            members.append(int(name))
    return members


def _unix_address(path):
    """A sun_path for `path`; long paths go through /proc/self/fd/<dir fd>/<name> (returned fd
    must be closed after bind/connect)."""
    if len(os.fsencode(path)) < 108:
        return path, None
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}", dir_fd


def main():
    p = argparse.ArgumentParser(description="opensci capture worker (fork server)")
    p.add_argument("--socket", required=True)
    p.add_argument("--lock", required=True, help="the start lock (held while retiring)")
    p.add_argument("--info", required=True, help="JSON file describing this worker (removed at exit)")
    p.add_argument("--key", required=True)
    p.add_argument("--idle", type=float, default=180.0, help="exit after this many seconds without a connection")
    p.add_argument("--mount-ns", action="store_true", help="attach the client's mounts in a private namespace")
    p.add_argument("--preimport", default=",".join(DEFAULT_PREIMPORTS))
    p.add_argument("--pollute-for-test", default="", help="comma-separated shims applied in the worker (tests)")
    p.add_argument("--script-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args()
    args.private_keys = [k for k in PRIVATE_KEYS if k in os.environ]

    worker = Worker(args)
    worker.preimport([n for n in args.preimport.split(",") if n])
    worker.pristine = Pristine({k: os.environ[k] for k in args.private_keys})
    if args.pollute_for_test:
        worker.pollute_for_test(args.pollute_for_test.split(","), args.script_dir)
    worker.listen(args.socket)
    info = {**worker.status(), "socket": args.socket, "log": None, "argv": sys.argv}
    tmp = args.info + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, args.info)
    log(f"ready: key {args.key}, imports {worker.import_seconds:.2f} s ({len(worker.preimported)} modules), "
        f"{len(worker.pristine.path_locations)} private-path constants, errors {worker.import_errors or 'none'}")
    worker.run()
    worker.remove_private_tmp()
    log(f"exiting after {worker.served} capture(s)")


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)
