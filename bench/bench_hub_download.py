#!/usr/bin/env python3
"""Download throughput on loopback: `opensci-compat download` against huggingface_hub's own
snapshot_download, same files, same loopback Hub (tests/usermodel/fake_hub.py), same run,
alternating, each into a fresh cache.

  bench_hub_download.py --cli BUILD/harness/opensci-compat --python VENV/bin/python
                        [--files 4 --mb 256 --rounds 3 --work /tmp/hub-bench]
VENV is a virtual environment with huggingface_hub (pip install huggingface_hub). Prints MB/s
per round and the median of each client; both verify the result against the repo's files.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--cli", required=True)
p.add_argument("--python", required=True, help="python with huggingface_hub")
p.add_argument("--files", type=int, default=4)
p.add_argument("--mb", type=int, default=256)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--work", default="/tmp/opensci-hub-bench")
a = p.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
shutil.rmtree(a.work, ignore_errors=True)
repo = os.path.join(a.work, "repo")
os.makedirs(repo)
with open(os.path.join(repo, "config.json"), "w") as f:
    json.dump({"model_type": "opensci"}, f)
block = os.urandom(1 << 20)
for i in range(a.files):
    with open(os.path.join(repo, f"model-{i + 1:05d}-of-{a.files:05d}.safetensors"), "wb") as f:
        for k in range(a.mb):
            f.write(block[k + i:] + block[: k + i])  # distinct files, no compressible pattern
total = sum(os.path.getsize(os.path.join(repo, n)) for n in os.listdir(repo))
server = subprocess.Popen([sys.executable, os.path.join(here, "../tests/usermodel/fake_hub.py"), "--repo", f"bench/model={repo}",
                           "--port-file", os.path.join(a.work, "port"), "--log", os.path.join(a.work, "log"),
                           "--storage-host", "127.0.0.2"],  # LFS files from another host, as the Hub's CDN
                          stderr=subprocess.DEVNULL)
while not os.path.exists(os.path.join(a.work, "port")):
    time.sleep(0.1)
endpoint = f"http://127.0.0.1:{open(os.path.join(a.work, 'port')).read()}"
env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")

PY = ("import sys, time; from huggingface_hub import snapshot_download; t = time.time(); "
      "d = snapshot_download('bench/model', cache_dir=sys.argv[1], max_workers=8); print(d); print(time.time() - t)")


def check(snapshot):
    for n in os.listdir(repo):
        if os.path.getsize(os.path.join(snapshot, n)) != os.path.getsize(os.path.join(repo, n)):
            sys.exit(f"{snapshot}/{n}: wrong size")


results = {"opensci-compat (libcurl)": [], f"huggingface_hub {subprocess.check_output([a.python, '-c', 'import huggingface_hub as h; print(h.__version__)'], text=True).strip()}": []}
names = list(results)
try:
    for r in range(a.rounds):
        for name in names:
            cache = os.path.join(a.work, f"cache-{r}-{name.split()[0]}")
            t = time.time()
            if name.startswith("opensci"):
                out = subprocess.run([a.cli, "download", "bench/model", "--quiet"], env=dict(env, HF_HUB_CACHE=cache),
                                     check=True, capture_output=True, text=True).stdout.strip()
            else:
                out = subprocess.run([a.python, "-c", PY, cache], env=env, check=True, capture_output=True,
                                     text=True).stdout.split()[0]
            s = time.time() - t
            check(out)
            results[name].append(total / s / 1e6)
            print(f"round {r + 1} {name:32} {total / 1e6:8.0f} MB in {s:6.2f} s = {total / s / 1e6:7.0f} MB/s (process wall time)")
            shutil.rmtree(cache)
finally:
    server.terminate()
print(f"\n{a.files} files x {a.mb} MiB + config.json over loopback from a Python http.server (sendfile; LFS files "
      f"redirected to 127.0.0.2), "
      f"{os.cpu_count()} CPUs; median of {a.rounds}:")
for name, v in results.items():
    print(f"  {name:32} {statistics.median(v):7.0f} MB/s")
shutil.rmtree(a.work, ignore_errors=True)
