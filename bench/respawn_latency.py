"""Respawn latency of minisup: kill -9 a child, time until its replacement
has exec'd.

Runs ``python -m minisup run --cmd "sleep 1000"`` on a private ipc endpoint,
then N times: SIGKILL the child and busy-poll /proc until the daemon has a
new child whose executable is ``sleep`` (i.e. exec has happened).  Prints the
median and the range.  Only minisup; bench/run.py (scenario 7) measures
it beside circusd and supervisord.

    python bench/respawn_latency.py [-n 20]
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import minisup

SLEEP = "/bin/sleep"
LIMIT = 5.0  # seconds: a respawn slower than this is a failure, not a sample


def children(pid):
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as stream:
            found.update(int(p) for p in stream.read().split())
    return found


def execd_child(daemon_pid, old):
    for pid in children(daemon_pid) - {old}:
        try:
            if os.readlink(f"/proc/{pid}/exe") == os.path.realpath(SLEEP):
                return pid
        except OSError:
            pass  # not exec'd yet, or gone
    return None


def measure(daemon_pid, client):
    (old,) = client.call("list", name="sleep")["pids"]
    started = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    while time.perf_counter() - started < LIMIT:
        new = execd_child(daemon_pid, old)
        if new:
            return time.perf_counter() - started
    raise RuntimeError(f"no respawn within the limit: old {old}, children {children(daemon_pid)}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        endpoint = f"ipc://{folder}/bench.sock"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "minisup", "run", "--cmd", f"{SLEEP} 1000",
             "--name", "sleep", "--endpoint", endpoint, "--log-level", "warning"],
            cwd=os.path.dirname(HERE))
        try:
            with minisup.Client(endpoint, timeout=1.0) as client:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        if client.call("list", name="sleep").get("pids"):
                            break
                    except minisup.CallError:
                        pass
                samples = []
                for _ in range(args.n):
                    # A child killed younger than min_uptime counts toward
                    # a crash loop and is respawned with a backoff: let it age.
                    time.sleep(minisup.WatcherConfig("x", "x").min_uptime + 0.1)
                    samples.append(measure(daemon.pid, client))
                client.call("quit")
            daemon.wait(30)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    ms = sorted(s * 1000 for s in samples)
    print(f"respawn after kill -9, until exec'd: median {statistics.median(ms):.2f} ms "
          f"(min {ms[0]:.2f}, max {ms[-1]:.2f}, n={len(ms)})")


if __name__ == "__main__":
    main()
