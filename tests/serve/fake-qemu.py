#!/usr/bin/env python3
"""A fake QEMU QMP monitor for the serve tests: SOCK MODE STATEFILE TIMEOUT_S.

It keeps what a real QEMU 7.2 keeps that the daemon depends on: whether the
guest runs (stop/cont), the snapshots saved, and snapshot-save/-load/-delete
jobs that stay "concluded" until job-dismiss, with job ids that may not be
reused.  After every command it writes its state to STATEFILE (JSON:
running, log of commands, snapshots, jobs).  MODE makes one thing go wrong:
  stop_slow       stop takes effect, its answer comes after the timeout
  stop_close      stop takes effect, then the connection closes
  save_close      the connection closes when snapshot-save arrives
  save_never      snapshot-save's job never concludes
  noise           before every answer: an event and a reply with another id
  status_wrongtype query-status answers a list
  job_errtype     a concluded job's error is an object, not a string
  jobs_slow_once  the first query-jobs answers after the timeout
  cont_err        cont is refused
  ok              nothing goes wrong
"""
import json, os, socket, sys, threading, time

sock, mode, statef, tmo = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
st = {"running": True, "log": [], "snapshots": [], "jobs": {}}
lock = threading.Lock()


def save():
    with open(statef + ".tmp", "w") as f:
        json.dump(st, f)
    os.rename(statef + ".tmp", statef)


def send(c, o):
    c.sendall(json.dumps(o).encode() + b"\r\n")


def job(cmd, a):
    """Run a snapshot job at once; None if its id is taken."""
    jid = a["job-id"]
    if jid in st["jobs"]:
        return None
    j = {"id": jid, "type": cmd, "status": "concluded", "current-progress": 1, "total-progress": 1}
    tag = a["tag"]
    if cmd == "snapshot-save":
        if tag in st["snapshots"]:
            j["error"] = "Snapshot '%s' already exists in one or more devices" % tag
        elif mode == "job_errtype":
            j["error"] = {"desc": "save failed"}
        else:
            st["snapshots"].append(tag)
        if mode == "save_never":
            j["status"] = "running"
    elif cmd == "snapshot-load" and tag not in st["snapshots"]:
        j["error"] = "Snapshot '%s' does not exist in one or more devices" % tag
    elif cmd == "snapshot-delete" and tag in st["snapshots"]:
        st["snapshots"].remove(tag)
    st["jobs"][jid] = j
    return j


def serve(c):
    send(c, {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}})
    for line in c.makefile("rb"):
        m = json.loads(line)
        cmd, a, idv = m["execute"], m.get("arguments", {}), m.get("id")
        with lock:
            st["log"].append(cmd)
            save()

        def rep(v):
            return {"return": v, "id": idv} if idv is not None else {"return": v}

        def err(d):
            o = {"error": {"class": "GenericError", "desc": d}}
            if idv is not None:
                o["id"] = idv
            return o
        if mode == "noise":
            send(c, {"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}})
            send(c, {"return": {}, "id": "not-yours"})
        r = rep({})
        with lock:
            if cmd == "query-status":
                r = rep([st["running"]] if mode == "status_wrongtype" else
                        {"running": st["running"], "status": "running" if st["running"] else "paused"})
            elif cmd == "query-named-block-nodes":
                r = rep([{"drv": "qcow2", "ro": False, "node-name": "vmstate"}])
            elif cmd == "stop":
                st["running"] = False
            elif cmd == "cont":
                if mode == "cont_err":
                    r = err("cont refused")
                else:
                    st["running"] = True
            elif cmd in ("snapshot-save", "snapshot-load", "snapshot-delete"):
                if mode == "save_close" and cmd == "snapshot-save":
                    c.close()
                    return
                if job(cmd, a) is None:
                    r = err("Job ID '%s' already in use" % a["job-id"])
            elif cmd == "query-jobs":
                r = rep(list(st["jobs"].values()))
            elif cmd == "job-cancel":
                j = st["jobs"].get(a["id"])
                if j:
                    j["status"] = "concluded"
                    j["error"] = "cancelled"
            elif cmd == "job-dismiss":
                st["jobs"].pop(a["id"], None)
            save()
        if cmd == "stop" and mode == "stop_slow":
            time.sleep(tmo + 0.5)
        if cmd == "stop" and mode == "stop_close":
            c.close()
            return
        if cmd == "query-jobs" and mode == "jobs_slow_once" and not st.get("slowed"):
            st["slowed"] = True
            time.sleep(tmo + 0.5)
        try:
            send(c, r)
        except OSError:
            return


save()
s = socket.socket(socket.AF_UNIX)
s.bind(sock)
s.listen(8)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
