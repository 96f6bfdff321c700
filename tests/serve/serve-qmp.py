#!/usr/bin/env python3
"""serve-qmp.py SOCK: bad input on the control socket.  Every case must get
an error object (or be refused) and leave the daemon serving."""
import json, socket, sys, threading, time

SOCK = sys.argv[1]

def fail(msg):
    print("FAIL:", msg, file=sys.stderr)
    sys.exit(1)

class Conn:
    def __init__(self, negotiate=True):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(60)
        self.s.connect(SOCK)
        self.f = self.s.makefile('rb')
        self.greeting = self.msg()
        if negotiate:
            self.send(b'{"execute":"qmp_capabilities"}')
            r = self.reply()
            if r != {"return": {}}:
                fail("negotiation: %r" % r)

    def msg(self):
        line = self.f.readline()
        if not line:
            raise EOFError
        return json.loads(line)

    def reply(self):
        while True:
            m = self.msg()
            if 'event' not in m:
                return m

    def send(self, b):
        self.s.sendall(b)

    def cmd(self, b):
        self.send(b)
        return self.reply()

    def close(self):
        self.f.close()
        self.s.close()

def expect_error(r, cls, text, what):
    e = r.get('error')
    if not e or e.get('class') != cls or text not in e.get('desc', ''):
        fail("%s: expected %s '%s', got %r" % (what, cls, text, r))
    print("ok: %s -> %s: %s" % (what, e['class'], e['desc']))

def alive(c):
    r = c.cmd(b'{"execute":"query-stats"}')
    if 'return' not in r or 'snapshots' not in r['return']:
        fail("daemon not serving: %r" % r)

# greeting, negotiation order
c = Conn(negotiate=False)
if 'QMP' not in c.greeting or 'capabilities' not in c.greeting['QMP']:
    fail("greeting %r" % c.greeting)
expect_error(c.cmd(b'{"execute":"query-stats"}'), "CommandNotFound",
             "qmp_capabilities", "command before negotiation")
c.cmd(b'{"execute":"qmp_capabilities"}')
expect_error(c.cmd(b'{"execute":"qmp_capabilities"}'), "CommandNotFound",
             "already", "second negotiation")

# malformed and wrong-shaped input, each followed by a working command
cases = [
    (b'{"execute": "query-stats",,}\n', "GenericError", "JSON parse error", "malformed JSON"),
    (b'[1, 2, 3]\n', "GenericError", "must be a JSON object", "not an object"),
    (b'"hello"\n', "GenericError", "must be a JSON object", "a string"),
    (b'{"arguments": {}}\n', "GenericError", "lacks member 'execute'", "no execute"),
    (b'{"execute": 42}\n', "GenericError", "must be a string", "execute not a string"),
    (b'{"execute": "flush", "arguments": [1]}\n', "GenericError", "must be an object",
     "arguments not an object"),
    (b'{"execute": "flush", "bogus": 1}\n', "GenericError", "unexpected", "extra member"),
    (b'{"execute": "no-such-command"}', "CommandNotFound", "no-such-command", "unknown command"),
    (b'{"execute": "snapshot-create"}', "GenericError", "'name' is missing", "missing argument"),
    (b'{"execute": "snapshot-create", "arguments": {"name": 5}}', "GenericError",
     "expected: string", "wrong argument type"),
    (b'{"execute": "snapshot-create", "arguments": {"name": ""}}', "GenericError",
     "empty", "empty name"),
    (b'{"execute": "snapshot-create", "arguments": {"name": "x", "kind": "bogus"}}',
     "GenericError", "bogus", "bad kind"),
    (b'{"execute": "snapshot-create", "arguments": {"name": "x", "vm": "yes"}}',
     "GenericError", "boolean", "vm not a boolean"),
    (b'{"execute": "snapshot-create", "arguments": {"name": "x", "vm": true}}',
     "GenericError", "--qmp", "vm without --qmp"),
    (b'{"execute": "snapshot-revert", "arguments": {"name": "nosuch"}}', "GenericError",
     "no snapshot named", "revert to a missing snapshot"),
    (b'{"execute": "snapshot-delete", "arguments": {"name": "nosuch"}}', "GenericError",
     "no snapshot named", "delete a missing snapshot"),
    (b'{"execute": "flush", "arguments": {"x": 1}}', "GenericError", "unexpected",
     "unexpected argument"),
    (b'{"execute": "query-stats"' + b' ' * 10 + b'\x00}\n', "GenericError", "JSON parse error",
     "a NUL byte"),
    (b'{"a":' * 100 + b'1' + b'}' * 100 + b'\n', "GenericError", "JSON parse error",
     "nesting too deep"),
    # what json-c takes outside strict JSON, and what it would echo wrongly
] + [(b'{"execute": "query-stats", "id": %s}' % idtext, "GenericError", text, what)
     for idtext, text, what in (
         (b'NaN', "JSON parse error", "NaN id"),
         (b'Infinity', "JSON parse error", "Infinity id"),
         (b'-Infinity', "JSON parse error", "-Infinity id"),
         (b'[1, NaN]', "JSON parse error", "NaN inside an id"),
         (b'99999999999999999999', "64-bit", "integer id past 64 bits"),
         (b'-9223372036854775809', "64-bit", "integer id below -2^63"),
         (b'[1, 2,]', "JSON parse error", "trailing comma"),
         (b'01', "JSON parse error", "leading zero"))] + [
    (b"{'execute': 'query-stats'}", "GenericError", "JSON parse error", "single quotes"),
    (b'{"execute": "snapshot-create", "arguments": {"name": "\xff\xfe"}}', "GenericError",
     "JSON parse error", "a name that is not UTF-8"),
]
for data, cls, text, what in cases:
    expect_error(c.cmd(data), cls, text, what)
    alive(c)

# the id is echoed, on returns and errors
r = c.cmd(b'{"execute": "query-stats", "id": {"n": 7}}')
if r.get('id') != {"n": 7}:
    fail("id not echoed: %r" % r)
r = c.cmd(b'{"execute": "nope", "id": "abc"}')
if r.get('id') != "abc":
    fail("id not echoed on error: %r" % r)
# ids at the edges of what is valid come back as they were sent
for idtext, want in ((b'18446744073709551615', 18446744073709551615),
                     (b'-9223372036854775808', -9223372036854775808),
                     (b'1e999', float('inf')), (b'"\\u00e9\xc3\xa9"', "\u00e9\u00e9")):
    r = c.cmd(b'{"execute": "query-stats", "id": ' + idtext + b'}')
    if r.get('id') != want:
        fail("id %r echoed as %r" % (idtext, r.get('id')))
print("ok: ids echoed")

# several commands in one write, no newlines
c.send(b'{"execute":"query-stats"}{"execute":"flush"}{"execute":"snapshot-list"}')
for i in range(3):
    if 'return' not in c.reply():
        fail("pipelined command %d" % i)
print("ok: pipelined commands")

# a huge line: an error, the rest of the line skipped, the connection goes on
huge = b'{"execute": "snapshot-create", "arguments": {"name": "' + b'a' * (3 << 20) + b'"}}\n'
t0 = time.time()
c.send(huge)
expect_error(c.reply(), "GenericError", "longer than", "3 MiB line")
alive(c)
c.close()

# a malformed message over several lines: one error, then the next command
c = Conn()
c.send(b'{"execute":\n  "flush",,\n  "id": 1}\n{"execute":"snapshot-list","id":"good"}\n')
expect_error(c.reply(), "GenericError", "JSON parse error", "malformed message over 3 lines")
r = c.reply()
if r.get('id') != 'good' or 'return' not in r:
    fail("after a malformed multi-line message: %r (more than one error?)" % r)
# an overlong message is discarded whole: a command on one of its lines
# must not run
huge = (b'{"execute":"snapshot-list","arguments":{"x":"' + b'A' * (3 << 20) + b'"},"pad":\n'
        b'{"execute":"snapshot-create","arguments":{"name":"injected"}}}\n')
c.send(huge)
expect_error(c.reply(), "GenericError", "longer than", "3 MiB message with a command inside")
names = [x['name'] for x in c.cmd(b'{"execute":"snapshot-list"}')['return']]
if 'injected' in names:
    fail("a command inside a discarded message ran")
print("ok: nothing inside a discarded message runs")
# the error for an overlong message comes as soon as it is overlong, before
# the message ends; the rest of it is discarded up to its end
c.send(b'{"execute":"flush","arguments":{"a":"' + b'A' * (2 << 20))
expect_error(c.reply(), "GenericError", "longer than", "2 MiB message not ended yet")
c.send(b'"}}\n')
alive(c)
expect_error(c.cmd(b'{"execute":"snapshot-create","arguments":{"name":"a\\u0000b"}}'),
             "GenericError", "NUL", "a NUL character in a name")
expect_error(c.cmd(b'{"execute":"query-commands","arguments":{"bogus":1}}'),
             "GenericError", "unexpected", "query-commands with an argument")
alive(c)
c.close()

# clients that never read: events to them must not hold up anyone else
c = Conn()
c.cmd(b'{"execute": "snapshot-create", "arguments": {"name": "slowbase"}}')
slow = [Conn() for _ in range(8)]
worst = 0.0
for i in range(600):
    t0 = time.time()
    r = c.cmd(b'{"execute": "snapshot-revert", "arguments": {"name": "slowbase"}}')
    worst = max(worst, time.time() - t0)
    if 'return' not in r:
        fail("revert with slow clients: %r" % r)
    if worst > 2:
        fail("a revert took %.1f s with 8 clients that never read" % worst)
t0 = time.time()
n = Conn()
alive(n)
if time.time() - t0 > 2:
    fail("a new client waited %.1f s while others do not read" % (time.time() - t0))
n.close()
for x in slow:
    x.close()
c.cmd(b'{"execute": "snapshot-delete", "arguments": {"name": "slowbase"}}')
print("ok: 600 reverts (events) with 8 clients that never read: worst %.0f ms" % (worst * 1000))
c.close()

# a client that disconnects mid-command: the command completes
d = Conn()
d.send(b'{"execute": "snapshot-create", "arguments": {"name": "mid"}}')
d.close()
c = Conn()
for _ in range(100):
    names = [s['name'] for s in c.cmd(b'{"execute":"snapshot-list"}')['return']]
    if 'mid' in names:
        break
    time.sleep(0.05)
else:
    fail("snapshot of a client that disconnected did not complete")
print("ok: command of a disconnected client completed")
# a client that disconnects halfway through a message
d = Conn()
d.send(b'{"execute": "snapshot-cre')
d.close()
alive(c)
print("ok: half a message then disconnect")

# many clients at once: the first ones are served, beyond the cap refused
conns, refused = [], 0
for i in range(40):
    try:
        x = Conn(negotiate=False)
        if 'error' in x.greeting:
            refused += 1
            x.close()
            continue
        conns.append(x)
    except (EOFError, ConnectionError):
        refused += 1
if len(conns) < 20 or refused == 0:
    fail("many clients: %d served, %d refused" % (len(conns), refused))
errs = []
def work(x):
    try:
        x.send(b'{"execute":"qmp_capabilities"}')
        if x.reply() != {"return": {}}:
            errs.append("negotiation")
        for _ in range(5):
            if 'return' not in x.cmd(b'{"execute":"snapshot-list"}'):
                errs.append("list")
    except Exception as e:
        errs.append(repr(e))
ths = [threading.Thread(target=work, args=(x,)) for x in conns]
for t in ths: t.start()
for t in ths: t.join()
if errs:
    fail("many clients: %s" % errs[:3])
print("ok: %d clients at once served, %d beyond the cap refused with an error" % (len(conns) - 1, refused))
for x in conns:
    x.close()
alive(c)

# the slots come back once those clients are gone
for _ in range(100):
    e = Conn(negotiate=False)
    if 'QMP' in e.greeting:
        break
    e.close()
    time.sleep(0.05)
else:
    fail("connection slots not released")
e.send(b'{"execute":"qmp_capabilities"}')
e.reply()
# events: a snapshot is announced to every negotiated client
c.cmd(b'{"execute": "snapshot-create", "arguments": {"name": "ev"}}')
m = e.msg()
if m.get('event') != 'SNAPSHOT_CREATED' or m['data']['name'] != 'ev' or 'timestamp' not in m:
    fail("event: %r" % m)
print("ok: SNAPSHOT_CREATED event")
e.close()

# commands sent in one write, then the connection closed at once (no
# reply read): every one of them runs, though their replies cannot go out
for k in range(5):
    p = socket.socket(socket.AF_UNIX)
    p.connect(SOCK)
    p.sendall(b'{"execute":"qmp_capabilities"}{"execute":"snapshot-create",'
              b'"arguments":{"name":"piped%d"}}' % k)
    p.close()
for _ in range(200):
    names = [x['name'] for x in c.cmd(b'{"execute":"snapshot-list"}')['return']]
    if all("piped%d" % k in names for k in range(5)):
        break
    time.sleep(0.05)
else:
    fail("pipelined commands of a client that closed at once did not all run: %r" % names)
for k in range(5):
    r = c.cmd(b'{"execute":"snapshot-delete","arguments":{"name":"piped%d"}}' % k)
    if 'return' not in r:
        fail("delete piped%d: %r" % (k, r))
print("ok: commands of a client that closed at once all ran")
c.close()
