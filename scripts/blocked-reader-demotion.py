#!/usr/bin/env python3
"""Would taking a pair off the shortcut ("demotion") save a blocking reader
that is already waiting in recv()? Run inside an accelerated cgroup:

    target/release/examples/accelerate -- \
        python3 scripts/blocked-reader-demotion.py MODE [ROUNDS]

Each round: a client connects with a timeout (a non-blocking connect, so the
pair is accelerated) and goes back to blocking mode; a reader thread blocks
in recv(); a writer sends 4 MiB into a server that starts reading 300 ms
later, then the server answers 1000 bytes and closes. MODE:

    keep                 the pair stays in the socket map (redirected)
    remove-after-block   both sockets are deleted from sock_map (bpftool)
                         after the reader blocked: the writer then sends
                         plain TCP while the reader still waits inside the
                         socket map's recvmsg
    remove-before-block  deleted before the reader blocks

Prints each round and "MODE: F of N rounds failed". Needs bpftool and one
loaded sock_map (this accelerator's). docs/known-limits.md has the numbers.
"""
import json, os, socket, subprocess, sys, threading, time

MODE = sys.argv[1]  # keep | remove-after-block | remove-before-block
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 10
SIZE = 4 << 20

def remove_all():
    out = subprocess.run(["bpftool", "-j", "map", "dump", "name", "sock_map"],
                         capture_output=True, text=True, check=True).stdout
    n = 0
    for entry in json.loads(out):
        key = [b[2:] for b in entry["key"]]
        subprocess.run(["bpftool", "map", "delete", "name", "sock_map", "key", "hex"] + key, check=True)
        n += 1
    return n

def one_round():
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
    c = socket.create_connection(l.getsockname(), timeout=5); c.settimeout(None)
    s, _ = l.accept()
    errors, got = [], [0]
    removed = remove_all() if MODE == "remove-before-block" else None
    def reader():
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                got[0] += len(d)
        except Exception as e:
            errors.append(repr(e))
    t = threading.Thread(target=reader); t.start()
    time.sleep(0.2)
    if MODE == "remove-after-block":
        removed = remove_all()
    def server():
        time.sleep(0.3)
        n = 0
        while n < SIZE:
            n += len(s.recv(65536))
        s.sendall(b"y" * 1000); s.shutdown(socket.SHUT_WR)
    st = threading.Thread(target=server); st.start()
    c.sendall(os.urandom(SIZE))
    st.join(); t.join(10)
    c.close(); s.close(); l.close()
    return removed, errors, got[0]

fails = 0
for i in range(ROUNDS):
    removed, errors, got = one_round()
    fails += bool(errors) or got != 1000
    print(f"round {i}: removed {removed}, reader got {got}, errors {errors}")
print(f"{MODE}: {fails} of {ROUNDS} rounds failed")
