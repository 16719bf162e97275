#!/usr/bin/env python3
"""Run a shell command in the vhost-net-batch test guest through its virtio-serial agent.

usage: ci/gexec.py SOCK [--timeout S] [--wait-ready S] [--pid QEMU_PID] [-- COMMAND...]

SOCK is the agent socket given to ci/qemu-run.sh --agent. COMMAND's words are joined with
spaces and run by 'sh -c' in the guest (stdin is /dev/null). Its combined stdout+stderr is
printed on stdout, and gexec exits with its exit code.

  --timeout S      limit for the command (default 300); when it passes, the command is killed
                   in the guest and gexec exits 124
  --wait-ready S   first wait up to S seconds for QEMU's socket and the agent to answer (the
                   guest is booting); prints the guest's VNB-GUEST-READY line on stderr.
                   Without a COMMAND, only waits.
  --pid PID        QEMU's pid: give up at once if it exits while waiting

Exit codes: the command's, 124 timeout, 2 usage, 255 connection failure (QEMU gone, ...).

Each run connects anew. QEMU's chardev server takes one client at a time; a second gexec
waits (within its time limit) until the first one disconnects.
On the wire (guest agent protocol: one command line in; its output, then "__VNB_RC__ <rc>"
out) each run sends: "echo <token1>" and skips everything up to its answer (stale output an
interrupted gexec left behind), then "exec vnb-run <limit> <base64 of COMMAND>" and
"echo <token2>"; the command's exit code is the __VNB_RC__ line just before token2's answer.
Note: the agent adds a newline to output that does not end with one.
"""
import argparse
import base64
import errno
import math
import os
import re
import socket
import sys
import time
import uuid


def alive(pid):
    """False once the process is gone or a zombie (its parent may reap it late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class Timeout(Exception):
    pass


class Gone(Exception):
    pass


class Channel:
    def __init__(self, path, deadline, pid=None):
        self.deadline = deadline
        self.pid = pid
        self.buf = b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise

    def close(self):
        self.sock.close()

    def send(self, line):
        try:
            self.sock.sendall(line)
        except OSError as e:
            raise Gone(f"connection to QEMU lost: {e.strerror or e}") from e

    def _recv(self):
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Timeout()
            if self.pid and not alive(self.pid):
                raise Gone(f"QEMU (pid {self.pid}) exited")
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                raise Gone(f"connection to QEMU lost: {e.strerror or e}") from e
            if not chunk:
                raise Gone("QEMU closed the agent connection (QEMU exited?)")
            self.buf += chunk
            return

    def sync(self):
        """Skip anything stale in the channel: run a unique echo and wait for its answer."""
        token = f"__VNB_SYNC_{uuid.uuid4().hex}"
        # The leading newline terminates a partial line an interrupted client may have left.
        self.send(f"\necho {token}\n".encode())
        want = f"{token}\n__VNB_RC__ 0\n".encode()
        while True:
            i = self.buf.find(want)
            if i >= 0:
                self.buf = self.buf[i + len(want):]
                return
            # Keep only what could still be the start of the answer.
            self.buf = self.buf[-len(want):]
            self._recv()

    def run(self, line):
        """Send one command line, followed by a unique echo; return (output, exit code).
        The command's own "__VNB_RC__ N" line is the last one before the echo's answer, so
        output that happens to contain such lines cannot confuse us."""
        token = f"__VNB_END_{uuid.uuid4().hex}"
        self.send(f"{line}\necho {token}\n".encode())
        end_re = re.compile(rb"__VNB_RC__ (-?\d+)\n" + token.encode() + rb"\n__VNB_RC__ 0\n")
        pos = 0
        while True:
            m = end_re.search(self.buf, pos)
            if m:
                out = self.buf[: m.start()]
                self.buf = self.buf[m.end():]
                return out, int(m.group(1))
            pos = max(0, len(self.buf) - 200)  # no need to rescan old output
            self._recv()


def guest_line(cmd, limit):
    """The line for the agent: the command, base64-encoded (any quoting or newline survives),
    run by the guest's vnb-run, which kills its whole process group after `limit` seconds (so a
    stuck command does not block later runs) and then exits 124."""
    b64 = base64.b64encode(cmd.encode()).decode()
    return f"exec vnb-run {max(1, math.ceil(limit))} {b64}"


def connect(path, deadline, pid, retry):
    """Connect to QEMU's chardev server. Its listen backlog is tiny: while another client is
    served, connect() may fail with EAGAIN; that is retried until the deadline. With retry, a
    missing socket or refused connection (QEMU not up yet) is retried too."""
    last = None
    while True:
        if pid and not alive(pid):
            raise Gone(f"QEMU (pid {pid}) exited")
        try:
            return Channel(path, deadline, pid)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            last = e
            if not retry:
                raise Gone(f"cannot connect to {path}: {e.strerror} "
                           "(is QEMU running with --agent on this socket?)") from e
        except (BlockingIOError, socket.timeout) as e:
            last = e
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EINTR):
                raise Gone(f"cannot connect to {path}: {e}") from e
            last = e
        if time.monotonic() >= deadline:
            raise Timeout(f"cannot connect to {path}: {last}")
        time.sleep(0.05 if isinstance(last, (BlockingIOError, socket.timeout)) else 0.2)


def wait_ready(path, seconds, pid):
    t0 = time.monotonic()
    deadline = t0 + seconds
    while True:
        ch = None
        try:
            ch = connect(path, deadline, pid, retry=True)
            ch.sync()
            out, _ = ch.run("cat /run/vnb-ready 2>/dev/null || echo VNB-GUEST-READY")
            line = out.decode(errors="replace").strip()
            print(f"gexec: {line} (agent answered after {time.monotonic() - t0:.1f} s)",
                  file=sys.stderr)
            return line
        except Gone as e:
            # QEMU restarting or the connection dropped: retry until the deadline, unless we
            # know QEMU is gone for good.
            if pid and not alive(pid):
                raise Gone(f"QEMU (pid {pid}) exited") from e
            if time.monotonic() >= deadline:
                raise Timeout(str(e)) from e
            time.sleep(0.2)
        finally:
            if ch:
                ch.close()


def main():
    argv = sys.argv[1:]
    words = []
    if "--" in argv:
        k = argv.index("--")
        argv, words = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(
        prog="ci/gexec.py", description=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="ci/gexec.py SOCK [--timeout S] [--wait-ready S] [--pid PID] [-- COMMAND...]")
    ap.add_argument("sock", help="agent socket (ci/qemu-run.sh --agent SOCK)")
    ap.add_argument("--timeout", type=float, default=300, help="command time limit, s (300)")
    ap.add_argument("--wait-ready", type=float, default=0, metavar="S",
                    help="wait up to S s for the guest agent first")
    ap.add_argument("--pid", type=int, default=0, help="QEMU pid (fail fast if it exits)")
    a = ap.parse_args(argv)
    cmd = " ".join(words).strip()
    if not cmd and not a.wait_ready:
        ap.error("give a COMMAND after -- (or --wait-ready S)")

    if a.wait_ready > 0:
        try:
            line = wait_ready(a.sock, a.wait_ready, a.pid)
            if "status=ok" not in line.split():
                # The guest init could not set something up (a module, the address, a server):
                # stop here rather than let a test fail later for a reason that hides this one.
                print("gexec: the guest came up degraded; its console log has the "
                      "VNB-GUEST-ERROR lines", file=sys.stderr)
                return 3
        except Timeout as e:
            why = f" (last: {e})" if str(e) else ""
            print(f"gexec: the guest agent at {a.sock} did not answer within {a.wait_ready:g} s"
                  f"{why}; is QEMU running, and what does its console log "
                  "(ci/qemu-run.sh --console-log) say?", file=sys.stderr)
            return 124
        except Gone as e:
            print(f"gexec: waiting for the guest agent at {a.sock}: {e}", file=sys.stderr)
            return 255
    if not cmd:
        return 0

    t0 = time.monotonic()
    ch = None
    try:
        ch = connect(a.sock, t0 + a.timeout, a.pid, retry=False)
        ch.sync()
        left = ch.deadline - time.monotonic()
        # Let the guest kill the command just before our own deadline, so its output arrives.
        ch.deadline += 5
        out, rc = ch.run(guest_line(cmd, left))
    except Timeout:
        print(f"gexec: timed out after {a.timeout:g} s: {cmd}\n"
              "gexec: (no answer from the guest agent: guest hung, or busy with an earlier "
              "command that another gexec gave up on)", file=sys.stderr)
        return 124
    except Gone as e:
        print(f"gexec: {e}", file=sys.stderr)
        return 255
    except OSError as e:
        print(f"gexec: agent socket {a.sock}: {e} (is QEMU running with --agent {a.sock}?)",
              file=sys.stderr)
        return 255
    finally:
        if ch:
            ch.close()
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    if rc == 124 and time.monotonic() - t0 >= a.timeout - 1:
        print(f"gexec: timed out after {a.timeout:g} s (killed in the guest): {cmd}",
              file=sys.stderr)
        return 124
    return rc


if __name__ == "__main__":
    sys.exit(main())
