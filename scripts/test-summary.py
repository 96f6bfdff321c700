#!/usr/bin/env python3
"""Print one closing line 'N passed, N failed, N skipped' over the meson
test logs given on the command line (build/meson-logs/testlog.json ...)."""
import json, sys
p = f = s = 0
for path in sys.argv[1:]:
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    r = json.loads(line).get('result', '')
                except ValueError:
                    continue
                if r in ('OK', 'EXPECTEDFAIL'):
                    p += 1
                elif r == 'SKIP':
                    s += 1
                else:
                    f += 1
    except OSError:
        pass
print(f"{p} passed, {f} failed, {s} skipped")
