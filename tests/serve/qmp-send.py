#!/usr/bin/env python3
"""qmp-send.py SOCK CMD_JSON...: a minimal QMP client for the tests.

Reads the greeting, sends qmp_capabilities, then each command, and prints
the reply to each (events are skipped) as one JSON line."""
import json, socket, sys

def main():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(120)
    s.connect(sys.argv[1])
    f = s.makefile('rb')

    def reply():
        while True:
            line = f.readline()
            if not line:
                raise SystemExit("connection closed")
            m = json.loads(line)
            if 'event' not in m:
                return m

    greeting = json.loads(f.readline())
    assert 'QMP' in greeting, greeting
    s.sendall(b'{"execute":"qmp_capabilities"}')
    r = reply()
    assert r == {'return': {}}, r
    for c in sys.argv[2:]:
        s.sendall(c.encode())
        print(json.dumps(reply()), flush=True)

main()
