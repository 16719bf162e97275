#!/usr/bin/env python3
"""Runs a shell command in the test guest through its virtio-serial agent.

ci/gexec.py SOCK [--timeout S] [--wait-ready S] [-- COMMAND...]
Prints the command's output and exits with its exit code (124 on timeout).
"""
import argparse
import socket
import sys
import time

MARK = b"__VNB_RC__ "


def run(sock_path, cmd, timeout):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    try:
        s.sendall(cmd.encode() + b"\n")
        buf = b""
        end = time.monotonic() + timeout
        while True:
            i = buf.find(MARK)
            if i >= 0 and buf.find(b"\n", i) >= 0:
                j = buf.find(b"\n", i)
                return buf[:i], int(buf[i + len(MARK):j])
            if time.monotonic() > end:
                raise TimeoutError
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("agent closed the connection")
            buf += chunk
    finally:
        s.close()


def main():
    argv = sys.argv[1:]
    cmd_words = []
    if "--" in argv:
        k = argv.index("--")
        argv, cmd_words = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sock")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--wait-ready", type=float, default=0)
    a = ap.parse_args(argv)
    cmd = " ".join(cmd_words).strip()
    if a.wait_ready:
        end = time.monotonic() + a.wait_ready
        while True:
            try:
                out, rc = run(a.sock, "echo ready", 3)
                if rc == 0 and b"ready" in out:
                    break
            except (OSError, TimeoutError, ConnectionError, ValueError):
                pass
            if time.monotonic() > end:
                print(f"gexec: guest agent at {a.sock} not ready after {a.wait_ready:.0f} s", file=sys.stderr)
                return 124
            time.sleep(0.5)
    if not cmd:
        return 0
    try:
        out, rc = run(a.sock, cmd, a.timeout)
    except TimeoutError:
        print(f"gexec: '{cmd}' timed out after {a.timeout:.0f} s", file=sys.stderr)
        return 124
    except (OSError, ConnectionError) as e:
        print(f"gexec: {e}", file=sys.stderr)
        return 125
    sys.stdout.buffer.write(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
