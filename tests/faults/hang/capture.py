# Fault: a hang, with a grandchild that must not survive the timeout. The grandchild's pid goes
# to <out-dir>/grandchild, then the capture's own to <out-dir>/pid (written last: both are there
# once pid is), so a test can check that this capture's processes are gone (tests run
# concurrently, each with its own hang: a match on the command line alone would see the others').
import argparse, os, subprocess, time
p = argparse.ArgumentParser()
p.add_argument("--out-dir", required=True)
a, _ = p.parse_known_args()
g = subprocess.Popen(["sleep", "987654"])
with open(os.path.join(a.out_dir, "grandchild"), "w") as f:
    f.write(str(g.pid))
with open(os.path.join(a.out_dir, "pid"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(1000)
