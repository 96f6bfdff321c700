#!/usr/bin/env python3
"""guest.py SERIAL_SOCK CMD...: send shell commands to the test guest over its
serial line (see guest-init.sh), one after the other; print each command's
output; exit non-zero when one fails or the guest does not answer.
"guest.py SOCK --boot" waits for the boot line and checks /dev/pmem0."""
import socket, sys, time

TIMEOUT = 120

s = socket.socket(socket.AF_UNIX)
for _ in range(200):
    try:
        s.connect(sys.argv[1])
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("guest.py: cannot connect to %s" % sys.argv[1])
s.settimeout(TIMEOUT)
buf = b''

def until(marker):
    global buf
    deadline = time.time() + TIMEOUT
    while marker not in buf:
        if time.time() > deadline:
            sys.exit("guest.py: no %r from the guest; got %r" % (marker, buf[-500:]))
        d = s.recv(65536)
        if not d:
            sys.exit("guest.py: serial line closed; got %r" % buf[-500:])
        buf += d
    i = buf.index(marker)
    out, buf = buf[:i], buf[i + len(marker):]
    return out

for cmd in sys.argv[2:]:
    if cmd == '--boot':
        until(b'@@boot ')
        line = until(b'\n').strip()
        if line != b'pmem=yes':
            sys.exit("guest.py: guest booted without /dev/pmem0: %r" % line)
        continue
    s.sendall(cmd.encode() + b'\n')
    out = until(b'@@rc=')
    rc = int(until(b'\n').strip())
    sys.stdout.write(out.decode(errors='replace').replace('\r', ''))
    if rc != 0:
        sys.exit("guest.py: %r exited %d" % (cmd, rc))
