#!/bin/bash
# A real guest (QEMU TCG, -machine pc,nvdimm=on) whose NVDIMM is the FUSE
# file (memory-backend-file,share=on): the guest writes /dev/pmem0; a
# whole-VM snapshot over the socket (stop, snapshot-save under
# x-ignore-shared, our snapshot, cont); the guest overwrites; a whole-VM
# revert; the guest reads the snapshot's pattern and its RAM state back.
# Then the plain path: the guest writes, powers off, qemu-io finds the data.
. "$SRCDIR/serve/lib.sh"
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -1)
[ -n "$kernel" ] || { echo "SKIP: no guest kernel (apt-get install linux-image-amd64)"; exit 77; }
kver=${kernel#/boot/vmlinuz-}
mods=/usr/lib/modules/$kver/kernel/drivers
command -v busybox >/dev/null && command -v cpio >/dev/null ||
    { echo "SKIP: busybox-static and cpio are needed for the guest"; exit 77; }
command -v qemu-system-x86_64 >/dev/null || { echo "SKIP: qemu-system-x86 is not installed"; exit 77; }

# the initramfs: busybox, the NVDIMM modules, guest-init.sh as /init
mkdir -p "$T/root/bin" "$T/root/lib" "$T/root/proc" "$T/root/sys" "$T/root/dev"
cp "$(command -v busybox)" "$T/root/bin/busybox"
for m in nvdimm/libnvdimm nvdimm/nd_btt nvdimm/nd_pmem acpi/nfit/nfit; do
    f=$(ls "$mods/$m.ko"* 2>/dev/null | head -1)
    [ -n "$f" ] || fail "module $m missing in $mods"
    case $f in
        *.xz) xz -dc "$f" > "$T/root/lib/${m##*/}.ko" ;;
        *.zst) zstd -qdc "$f" > "$T/root/lib/${m##*/}.ko" ;;
        *) cp "$f" "$T/root/lib/${m##*/}.ko" ;;
    esac
done
cp "$SRCDIR/serve/guest-init.sh" "$T/root/init"
chmod +x "$T/root/init"
(cd "$T/root" && find . | cpio -o -H newc --quiet | gzip -1) > "$T/initrd.gz"

nv=$T/nvdimm.qcow2 vms=$T/vmstate.qcow2
qemu-img create -q -f qcow2 "$nv" 128M
qemu-img create -q -f qcow2 "$vms" 1G
F=$T/nv.file S=$T/nv.sock
run_vm() {
    qemu-system-x86_64 -machine pc,nvdimm=on -accel tcg -cpu qemu64 -smp 1 \
        -m 128M,slots=2,maxmem=1G -nographic -no-reboot -nodefaults \
        -kernel "$kernel" -initrd "$T/initrd.gz" -append "console=ttyS0 quiet panic=-1" \
        -object memory-backend-file,id=nv0,share=on,mem-path="$F",size=128M \
        -device nvdimm,id=nvdimm0,memdev=nv0 \
        -blockdev driver=file,filename="$vms",node-name=vmsfile \
        -blockdev driver=qcow2,file=vmsfile,node-name=vmstate \
        -chardev socket,id=ser0,path="$T/serial.sock",server=on,wait=off -serial chardev:ser0 \
        -qmp unix:"$T/vm.qmp",server=on,wait=off \
        >"$T/qemu.log" 2>&1 &
    qpid=$!
    DAEMONS+=("$qpid")
}
G() { python3 "$SRCDIR/serve/guest.py" "$T/serial.sock" "$@"; }

start "$nv" nv --qmp "$T/vm.qmp"
run_vm
t0=$(date +%s%N)
G --boot || fail "guest boot: $(tail -5 "$T/qemu.log")"
echo "  guest booted in $(( ($(date +%s%N) - t0) / 1000000 )) ms"

# pattern A (0x41) into the NVDIMM, a marker in the guest's RAM
G "printf 'A%.0s' \$(seq 4096) > /tmp/a && for i in \$(seq 64); do cat /tmp/a; done > /tmp/a64 && dd if=/tmp/a64 of=/dev/pmem0 bs=256k count=1 2>/dev/null" \
  "echo one > /tmp/state" || fail "guest write A"
t0=$(date +%s%N)
"$P" snapshot -c vm1 --vm --socket "$S" || fail "whole-VM snapshot: $(tail -3 "$T/nv.log")"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "  whole-VM snapshot in $ms ms: $("$P" stats --socket "$S" | grep -E 'last-(vm|final|commit)' | tr '\n' ' ')"
qemu-img snapshot -U -l "$vms" | grep -q " vm1 " || fail "QEMU's state snapshot missing on the vmstate disk"

# the guest changes its NVDIMM and its RAM, then the whole VM is reverted
G "printf 'B%.0s' \$(seq 4096) > /tmp/b && for i in \$(seq 64); do cat /tmp/b; done > /tmp/b64 && dd if=/tmp/b64 of=/dev/pmem0 bs=256k count=1 2>/dev/null" \
  "echo two > /tmp/state" "head -c 4 /dev/pmem0 | grep -q BBBB" || fail "guest write B"
"$P" snapshot -a vm1 --vm --socket "$S" || fail "whole-VM revert: $(tail -3 "$T/nv.log")"
out=$(G "cat /tmp/state" "head -c 262144 /dev/pmem0 | tr -d A | wc -c") || fail "guest after revert: $out"
[ "$(echo $out)" = "one 0" ] || fail "after revert the guest says '$(echo $out)', expected 'one 0'"
ok "whole-VM snapshot ($ms ms), overwrite, revert: the guest's RAM and NVDIMM are back (state one, 256 KiB of A)"

# the image as QEMU's tools see it
qemu-img convert -U -f qcow2 -O raw -l snapshot.name=vm1 "$nv" "$T/vm1.raw"
cmp <(head -c 262144 "$T/vm1.raw") <(head -c 262144 /dev/zero | tr '\0' A) || fail "vm1 snapshot bytes"

# --qmp without --vm: the guest is paused around the final flush and commit,
# QEMU's state is not saved
"$P" snapshot -c nvonly --socket "$S" || fail "NVDIMM-only snapshot"
paused=$("$P" stats --socket "$S" | awk '$1 == "last-vm-paused-us:" { print $2 }')
[ "$paused" -gt 0 ] || fail "the guest was not paused for the NVDIMM-only snapshot"
qemu-img snapshot -U -l "$vms" | grep -q " nvonly " && fail "nvonly saved QEMU's state"
ok "NVDIMM-only snapshot with --qmp: guest paused $paused us, no QEMU state saved"

# a QMP failure (QEMU refuses snapshot-save: the tag exists on its disk)
# leaves the VM running and the image unchanged
python3 "$SRCDIR/serve/qmp-send.py" "$T/vm.qmp" \
    '{"execute":"human-monitor-command","arguments":{"command-line":"savevm dup"}}' >/dev/null
"$P" snapshot -c dup --vm --socket "$S" 2>"$T/dup.err" && fail "snapshot over an existing QEMU tag succeeded"
grep -q "snapshot-save" "$T/dup.err" || fail "error: $(cat "$T/dup.err")"
"$P" snapshot -l --socket "$S" | grep -q " dup " && fail "the image got a snapshot though QEMU failed"
python3 "$SRCDIR/serve/qmp-send.py" "$T/vm.qmp" '{"execute":"query-status"}' | grep -q '"running": true' ||
    fail "VM not running after the failed snapshot"
G "echo alive" | grep -q alive || fail "guest does not answer after the failed snapshot"
ok "QEMU refusing snapshot-save: error reported ($(cut -c1-120 "$T/dup.err")), VM running, image unchanged"

# a whole-VM revert QEMU cannot do (nvonly has no QEMU state): error, the VM
# runs on, the NVDIMM unchanged
G "printf 'D%.0s' \$(seq 4096) > /tmp/d && dd if=/tmp/d of=/dev/pmem0 bs=4k seek=2048 2>/dev/null" || fail "guest write D"
"$P" snapshot -a nvonly --vm --socket "$S" 2>"$T/load.err" && fail "revert without QEMU state succeeded"
grep -q "snapshot-load" "$T/load.err" || fail "error: $(cat "$T/load.err")"
out=$(G "head -c 4096 /dev/pmem0 | tail -c 1; dd if=/dev/pmem0 bs=4k skip=2048 count=1 2>/dev/null | tr -d D | wc -c") ||
    fail "guest after the failed revert"
[ "$(echo $out)" = "A0" ] || fail "after the failed revert the guest sees '$(echo $out)'"
ok "whole-VM revert QEMU refuses: error ($(cut -c1-100 "$T/load.err")), the guest runs on, NVDIMM unchanged"

# a whole-VM delete removes both halves
"$P" snapshot -d vm1 --vm --socket "$S" || fail "whole-VM delete"
qemu-img snapshot -U -l "$vms" | grep -q " vm1 " && fail "QEMU's vm1 still there"
"$P" snapshot -l --socket "$S" | grep -q " vm1 " && fail "our vm1 still there"
ok "whole-VM delete: QEMU's state and the NVDIMM's snapshot gone"

# our half of a whole-VM revert failing after QEMU loaded its state (an
# external snapshot cannot be reverted to while the live image holds an
# internal one): error, and the VM is left paused, not run half-reverted
"$P" snapshot -c ex --kind external --vm --socket "$S" || fail "external whole-VM snapshot"
[ -f "$nv@ex" ] || fail "no layer file $nv@ex"
"$P" snapshot -c in2 --socket "$S" || fail "internal snapshot on the new overlay"
"$P" snapshot -a ex --vm --socket "$S" 2>"$T/half.err" && fail "half revert succeeded"
grep -q "left paused" "$T/half.err" || fail "error: $(cat "$T/half.err")"
python3 "$SRCDIR/serve/qmp-send.py" "$T/vm.qmp" '{"execute":"query-status"}' | grep -q '"running": false' ||
    fail "VM running after a half revert"
python3 "$SRCDIR/serve/qmp-send.py" "$T/vm.qmp" '{"execute":"cont"}' >/dev/null
G "echo alive" | grep -q alive || fail "guest after cont"
ok "our revert refused after QEMU's load: VM left paused ($(cut -c1-90 "$T/half.err")...)"

# the plain path: write, power off, the data is in the image
G "printf 'C%.0s' \$(seq 4096) > /tmp/c && dd if=/tmp/c of=/dev/pmem0 bs=4k seek=1024 2>/dev/null" || fail "guest write C"
G "poweroff -f" 2>/dev/null
for _ in $(seq 100); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$qpid" 2>/dev/null && fail "guest did not power off"
stop nv
check_img "$nv"
check_img "$vms"
qio "$nv" "read -P 0x41 0 256k" "read -P 0x43 4M 4k"
qemu-img snapshot -l "$nv" | grep -q " in2 " || fail "in2 missing in the NVDIMM image"
qemu-img snapshot -l "$nv@ex" | grep -q " nvonly " || fail "nvonly missing in the layer"
check_img "$nv@ex"
ok "guest powered off: qemu-io finds its writes, both images clean"
echo "serve-vm: all passed"
