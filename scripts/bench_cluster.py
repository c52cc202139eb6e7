"""Start and stop throwaway clusters of an etcd-compatible member binary
(etcd 3.4 or cairn) on loopback, with free ports and a temporary directory,
and read the members' memory from /proc.

Both binaries take etcd's flags, so one driver serves both.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`members` processes of `binary` forming one cluster."""

    def __init__(self, binary, members, tag, parent_dir=None):
        self.binary = binary
        self.members = members
        self.tag = tag
        self.dir = tempfile.mkdtemp(prefix=f"bench-{tag}-", dir=parent_dir)
        self.client_ports = [free_port() for _ in range(members)]
        self.peer_ports = [free_port() for _ in range(members)]
        self.procs = []

    @property
    def endpoints(self):
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    def start(self, timeout=30.0):
        initial = ",".join(
            f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(self.peer_ports)
        )
        for i in range(self.members):
            client = f"http://127.0.0.1:{self.client_ports[i]}"
            peer = f"http://127.0.0.1:{self.peer_ports[i]}"
            log = open(os.path.join(self.dir, f"m{i}.log"), "wb")
            args = [
                self.binary,
                "--name", f"m{i}",
                "--data-dir", os.path.join(self.dir, f"m{i}"),
                "--listen-client-urls", client,
                "--advertise-client-urls", client,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initial,
                "--initial-cluster-token", f"bench-{self.tag}",
                "--initial-cluster-state", "new",
            ]
            self.procs.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{self.tag}: a member exited: {self.log_tail()}")
            if self.etcdctl("put", "/bench/ready", "x", check=False).returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"{self.tag}: no write accepted in {timeout}s: {self.log_tail()}")

    def etcdctl(self, *args, check=True):
        return subprocess.run(
            ["etcdctl", "--endpoints", ",".join(self.endpoints),
             "--command-timeout=2s", *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
            check=check,
        )

    def log_tail(self, lines=5):
        path = os.path.join(self.dir, "m0.log")
        try:
            with open(path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def reset_peak_rss(self):
        """Makes VmHWM start again from the current RSS (Linux clear_refs 5)."""
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def peak_rss_mib(self):
        """Each member's peak resident memory (VmHWM) in MiB."""
        return [status_kib(p.pid, "VmHWM") / 1024 for p in self.procs]

    def rss_mib(self):
        """Each member's resident memory now (VmRSS) in MiB."""
        return [status_kib(p.pid, "VmRSS") / 1024 for p in self.procs]

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
