#!/usr/bin/env python3
"""Thread-per-direction programs with blocking sockets: an echo server, a
relay in front of it and a client, each socket read by one thread while
another writes it. Runs TRANSFERS transfers of SIZE bytes each way through
the relay and prints "intact N of T, exceptions E". Python standard library
only; used by scripts/real-programs.sh.

    blocking-relay.py [TRANSFERS] [SIZE] [late]

With "late", each client connects with a timeout (a non-blocking connect
inside Python) and then goes back to blocking mode, as hiredis and many
libraries do: the connect-time rule cannot see that (README "Known limits").
"""
import os
import socket
import sys
import threading

TRANSFERS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 4 << 20
LATE_BLOCKING = len(sys.argv) > 3 and sys.argv[3] == "late"
errors = []


def guarded(fn, *args):
    """Runs fn in a thread; an exception is recorded, as a program's crash."""
    def run():
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - any failure counts
            errors.append(f"{fn.__name__}: {err!r}")
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def pump(src, dst):
    while True:
        data = src.recv(65536)
        if not data:
            break
        dst.sendall(data)
    dst.shutdown(socket.SHUT_WR)


def serve(listener, handle):
    while True:
        conn, _ = listener.accept()
        handle(conn)


def echo(conn):
    guarded(pump, conn, conn)


def relay_to(upstream):
    def handle(down):
        up = socket.create_connection(upstream)
        guarded(pump, down, up)
        guarded(pump, up, down)
    return handle


def listen():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def transfer(relay_addr):
    data = os.urandom(SIZE)
    if LATE_BLOCKING:
        c = socket.create_connection(relay_addr, timeout=5)
        c.settimeout(None)
    else:
        c = socket.create_connection(relay_addr)
    w = guarded(lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
    got = bytearray()
    while True:
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
    w.join()
    c.close()
    return bytes(got) == data


def give_up():
    print(f"not done after {DEADLINE} s (hung), exceptions {len(errors)}")
    for e in errors[:5]:
        print(e, file=sys.stderr)
    sys.stdout.flush()
    os._exit(1)


DEADLINE = 120


def main():
    # A transfer whose relay thread crashed never ends: stop, do not hang.
    watchdog = threading.Timer(DEADLINE, give_up)
    watchdog.daemon = True
    watchdog.start()
    echo_l, relay_l = listen(), listen()
    guarded(serve, echo_l, echo)
    guarded(serve, relay_l, relay_to(echo_l.getsockname()))
    intact = 0
    for _ in range(TRANSFERS):
        try:
            intact += transfer(relay_l.getsockname())
        except Exception as err:  # noqa: BLE001
            errors.append(f"client: {err!r}")
    print(f"intact {intact} of {TRANSFERS}, exceptions {len(errors)}")
    for e in errors[:5]:
        print(e, file=sys.stderr)
    sys.exit(0 if intact == TRANSFERS and not errors else 1)


if __name__ == "__main__":
    main()
