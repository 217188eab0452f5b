# Fault: a hang, with a grandchild that must not survive the timeout.
import subprocess, time
subprocess.Popen(["sleep", "987654"])
time.sleep(1000)
