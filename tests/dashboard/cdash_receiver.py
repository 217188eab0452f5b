#!/usr/bin/env python3
"""A CDash submit endpoint on loopback, for testing the dashboard scripts end to end.

Speaks what ctest_submit speaks (CMake's cmCTestSubmitHandler, CDash's submit.php): an HTTP PUT
of each XML file to  <url>?project=P&FileName=<site>___<build>___<stamp>___XML___Test.xml
&build=..&site=..&stamp=..&MD5=<md5 of the body>, answered by
  <cdash version=".."><status>OK</status><message/><md5>..</md5><buildId>..</buildId></cdash>
A body whose MD5 does not match is rejected as CDash does (status ERROR, nothing stored).

Modes: ok (store the files), http500 (answer 500), slow (read the body, then answer nothing for
--delay seconds: a server past the client's timeout), cdash-error (200 with <status>ERROR</status>).
Binds 127.0.0.1 only, writes its port to --port-file, and stops by itself after --max-seconds.
"""
import argparse
import hashlib
import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(args):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # answers curl's "Expect: 100-continue"

        def log_message(self, fmt, *a):
            with open(os.path.join(args.out, "access.log"), "a") as f:
                f.write("%s %s\n" % (self.log_date_time_string(), fmt % a))

        def reply(self, code, body):
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self):
            url = urllib.parse.urlsplit(self.path)
            q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
            n = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(n)
            md5 = hashlib.md5(body).hexdigest()
            record = {"path": url.path, "query": q, "bytes": len(body), "md5": md5, "mode": args.mode}
            with open(os.path.join(args.out, "requests.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if args.mode == "http500":
                return self.reply(500, "Internal Server Error\n")
            if args.mode == "slow":
                time.sleep(args.delay)
                return self.reply(200, "<cdash version=\"3.0\"><status>OK</status></cdash>\n")
            if args.mode == "cdash-error":
                return self.reply(200, "<cdash version=\"3.0\">\n  <status>ERROR</status>\n"
                                       "  <message>Project does not exist</message>\n</cdash>\n")
            if q.get("MD5") != md5:
                return self.reply(200, "<cdash version=\"3.0\">\n  <status>ERROR</status>\n  <message>Checksum "
                                       f"failed for file. Expected {q.get('MD5')} but got {md5}.</message>\n</cdash>\n")
            name = os.path.basename(q.get("FileName", "unnamed.xml"))
            with open(os.path.join(args.out, name), "wb") as f:
                f.write(body)
            return self.reply(200, "<cdash version=\"3.0\">\n  <status>OK</status>\n  <message></message>\n"
                                   f"  <md5>{md5}</md5>\n  <buildId>42</buildId>\n</cdash>\n")

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=["ok", "http500", "slow", "cdash-error"], default="ok")
    ap.add_argument("--out", required=True, help="stored files, requests.jsonl, access.log")
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--delay", type=float, default=10.0, help="slow mode: seconds before answering")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop by itself after this long")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(args))
    server.daemon_threads = True
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    timer = threading.Timer(args.max_seconds, server.shutdown)
    timer.daemon = True
    timer.start()
    server.serve_forever()


if __name__ == "__main__":
    main()
