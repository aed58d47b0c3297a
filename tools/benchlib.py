"""tools/benchlib.py - shared code of the tools/bench-* scripts (Python 3 stdlib).

Each benchmark script runs twice:
  * on the host ("outer"): it builds the guest initramfs(es) into a fresh
    directory under build/harness-work/ and calls tools/harness ONCE, with
    itself as the command and `--inner DIR`;
  * inside L2 ("inner"): it runs tidevm and QEMU 10 (-accel kvm) one after
    the other, on the same guest kernel/initramfs, prints the result table
    and stores it as DIR/results.json and DIR/results.txt.

Absolute times inside the nested TCG harness are far from hardware speed and
noisy; only the ratios of a single run (tidevm / QEMU) mean something.
"""

import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "build", "assets")
WORK = os.path.join(REPO, "build", "harness-work")
TIDEVM = os.path.join(REPO, "target", "release", "tidevm")
VMLINUX = os.path.join(ASSETS, "vmlinux")
BZIMAGE = os.path.join(ASSETS, "bzImage")
# TIDEVM_BENCH_APPEND adds guest kernel parameters for an experiment (e.g.
# nokaslr, so that a crash address maps to System.map).
CMDLINE = " ".join(["console=ttyS0 reboot=k panic=-1 quiet",
                    os.environ.get("TIDEVM_BENCH_APPEND", "")]).strip()
MIB = 1 << 20
GIB = 1 << 30
# Terminal control sequences (SeaBIOS clears the screen before the kernel).
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[^\[]")

# --------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------
def outer_main(script, scenarios, harness_args=(), extra_args=(), adds=()):
    """Build the initramfs for each scenario {name: text} (plus the extra
    host files `adds`, "SRC:/DEST" as for `tools/guest-assets initramfs
    --add`), run `script --inner DIR` in one harness run, print where the
    results are; exit with its status."""
    for p in (TIDEVM, VMLINUX, BZIMAGE):
        if not os.path.exists(p):
            sys.exit(f"{script}: {p} missing (cargo build --release -p vmm; "
                     "tools/guest-assets)")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "vmm"], cwd=REPO,
                   check=True)
    name = os.path.basename(script)
    d = os.path.join(WORK, f"{name}-{os.getpid()}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for sname, text in scenarios.items():
        out = os.path.join(d, f"initramfs-{sname}.cpio.gz")
        subprocess.run([os.path.join(REPO, "tools", "guest-assets"), "initramfs",
                        "--out", out, "--scenario-text", text,
                        *[f"--add={x}" for x in adds]], check=True,
                       stdout=subprocess.DEVNULL)
    cmd = [os.path.join(REPO, "tools", "harness"), *harness_args, "--",
           "python3", os.path.abspath(script), "--inner", d, *extra_args]
    print(f"# {name}: results and logs in {d}", file=sys.stderr, flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc != 0:
        print(f"# {name}: harness run failed with status {rc} "
              f"(L2 log: {WORK}/l2-serial.log)", file=sys.stderr)
    sys.exit(rc)


# --------------------------------------------------------------------------
# inside L2
# --------------------------------------------------------------------------
def log(msg):
    print(f"# [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def l2_info():
    """A line describing the machine the numbers come from."""
    try:
        ver = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True).stdout.splitlines()[0]
    except Exception:  # noqa: BLE001
        ver = "qemu ?"
    try:
        tv = subprocess.run([TIDEVM, "--version"], capture_output=True,
                            text=True).stdout.strip()
    except Exception:  # noqa: BLE001
        tv = "tidevm ?"
    return f"L2: {os.cpu_count()} vCPUs, kernel {os.uname().release}; {tv}; {ver}"


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Guest:
    """A VMM process whose stdout is the guest serial console and whose stdin
    is the guest's console input.  Console lines are timestamped by a reader
    thread; KEY=VALUE lines can be waited for."""

    def __init__(self, name, argv, logpath):
        self.name = name
        self.argv = argv
        self.log = open(logpath, "w")
        self.log.write("# " + " ".join(argv) + "\n")
        self.log.flush()
        self.lines = []          # (t, text)
        self.cv = threading.Condition()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, bufsize=0)
        self.pid = self.proc.pid
        self.exit_t = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        buf = b""
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            now = time.monotonic()
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            if done:
                with self.cv:
                    for raw in done:
                        text = ANSI_RE.sub("", raw.decode("utf-8", "replace"))
                        text = text.rstrip("\r")
                        self.lines.append((now, text))
                        self.log.write(f"{now - self.t0:9.3f} {text}\n")
                    self.log.flush()
                    self.cv.notify_all()
        rc = self.proc.wait()
        with self.cv:
            self.exit_t = time.monotonic()
            if buf:
                self.lines.append((self.exit_t, buf.decode("utf-8", "replace")))
            self.log.write(f"{self.exit_t - self.t0:9.3f} # exit status {rc}\n")
            self.log.flush()
            self.cv.notify_all()

    def wait_kv(self, key, timeout, start=0, pred=None):
        """First KEY=VALUE line at index >= start (and pred(value) true).
        Returns (t, value, index) or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        i = start
        with self.cv:
            while True:
                while i < len(self.lines):
                    t, text = self.lines[i]
                    # A KEY=VALUE line; firmware/kernel text without a
                    # newline may come before it on the same line.
                    m = re.search(rf"(?<![A-Za-z0-9_]){key}=(.*?)\s*$", text)
                    if m and (pred is None or pred(m.group(1))):
                        return t, m.group(1), i
                    i += 1
                if self.exit_t is not None:
                    raise TimeoutError(f"{self.name}: exited before {key}=")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no {key}= within {timeout} s")
                self.cv.wait(left)

    def mark(self):
        with self.cv:
            return len(self.lines)

    def send(self, line):
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def ask(self, cmd, key, timeout=120):
        start = self.mark()
        self.send(cmd)
        return self.wait_kv(key, timeout, start)[1]

    def wait_exit(self, timeout):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.reader.join(5)
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5)

    def rss(self):
        return rss_kib(self.pid)


def qemu_argv(kernel, initrd, mem, cpus, machine="q35", append=CMDLINE, extra=()):
    return ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-M", machine,
            "-m", mem, "-smp", str(cpus), "-nodefaults", "-nographic", "-no-reboot",
            "-serial", "stdio", "-monitor", "none",
            "-kernel", kernel, "-initrd", initrd, "-append", append, *extra]


def tidevm_argv(initrd, mem, cpus, cmdline=CMDLINE, extra=()):
    return [TIDEVM, "--kernel", VMLINUX, "--initrd", initrd, "--cmdline", cmdline,
            "--cpus", str(cpus), "--memory", mem, *extra]


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout=30):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


class TidevmApi:
    def __init__(self, path):
        self.path = path

    def call(self, method, url, body=None):
        c = _UnixHTTP(self.path)
        try:
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": "application/json"} if data else {}
            c.request(method, url, body=data, headers=headers)
            r = c.getresponse()
            text = r.read().decode()
            return r.status, (json.loads(text) if text.strip() else None)
        finally:
            c.close()

    def get(self, url):
        st, j = self.call("GET", url)
        if st != 200:
            raise RuntimeError(f"GET {url}: {st} {j}")
        return j

    def put(self, url, body=None):
        st, j = self.call("PUT", url, body)
        if st not in (200, 204):
            raise RuntimeError(f"PUT {url} {body}: {st} {j}")
        return j

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.get("/vm/info")
            except (OSError, RuntimeError, http.client.HTTPException):
                time.sleep(0.05)
        raise TimeoutError(f"API socket {self.path} not answering")


class Qmp:
    def __init__(self, path, timeout=30):
        self.path = path
        self.reconnects = 0
        self._connect(timeout)

    def _connect(self, timeout):
        path = self.path
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.s.settimeout(60)
        self.f = self.s.makefile("rwb", buffering=0)
        json.loads(self.f.readline())          # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        try:
            return self._cmd(name, args)
        except (ConnectionResetError, BrokenPipeError, EOFError) as e:
            # Seen in L2: QEMU 10 resetting the QMP connection while
            # virtio-mem unplugs.  The server socket still listens: count
            # it, reconnect and retry once.
            log(f"QMP {name}: {e!r}; reconnecting")
            self.reconnects += 1
            self.close()
            self._connect(10)
            return self._cmd(name, args)

    def _cmd(self, name, args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError("QMP connection closed")
            r = json.loads(line)
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"QMP {name} {args}: {r['error']}")
            return r.get("return")

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(x, nd=2):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table(headers, rows):
    """Markdown table, columns padded."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, r in enumerate(cells):
        out.append("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(out)


def save_dmesg(d):
    """L2's kernel log (OOM kills, soft lockups) next to the results: the
    shared l2-serial.log is overwritten by any other harness run."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=20).stdout
        with open(os.path.join(d, "l2-dmesg.txt"), "w") as f:
            f.write(out)
    except Exception:  # noqa: BLE001
        pass


def finish(d, title, text, data):
    """Print the result text and store it (plus raw data) in d."""
    save_dmesg(d)
    body = f"{title}\n{l2_info()}\n\n{text}\n"
    print(body, flush=True)
    with open(os.path.join(d, "results.txt"), "w") as f:
        f.write(body)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
