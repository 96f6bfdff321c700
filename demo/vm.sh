#!/bin/bash
# make demo, the VM scene: a small guest boots with its NVDIMM served by
# `pmemsnap serve`, writes to it, a whole-VM snapshot is taken and timed
# beside QEMU's own savevm of the same VM, the guest changes its NVDIMM and
# its memory, the snapshot is reverted, and the guest continues from it.
set -eu
BUILD=${1:-build}
P=$BUILD/tools/pmemsnap
SRC=$(cd "$(dirname "$0")/.." && pwd)/tests/serve
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -1)
if [ ! -e /dev/fuse ] || [ -z "$kernel" ] || ! command -v busybox >/dev/null; then
    echo "(VM scene skipped: needs /dev/fuse, linux-image-amd64, busybox-static)"
    exit 0
fi
dir=$(mktemp -d /var/tmp/pmemsnap-demo-vm.XXXXXX)
vmpid=
cleanup() {
    [ -n "$vmpid" ] && kill "$vmpid" 2>/dev/null
    [ -e "$dir/d.pid" ] && kill "$(cat "$dir/d.pid")" 2>/dev/null
    sleep 0.5
    umount -l "$dir/nvdimm" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
G() { python3 "$SRC/guest.py" "$dir/serial.sock" "$@" | sed 's/^/   guest| /'; }
Q() { python3 "$SRC/qmp-send.py" "$dir/vm.qmp" "$@"; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

# the guest: Debian's kernel, busybox, the NVDIMM drivers, a tiny /init
kver=${kernel#/boot/vmlinuz-}
mkdir -p "$dir/root/bin" "$dir/root/lib"
cp "$(command -v busybox)" "$dir/root/bin/busybox"
for m in nvdimm/libnvdimm nvdimm/nd_btt nvdimm/nd_pmem acpi/nfit/nfit; do
    f=$(ls "/usr/lib/modules/$kver/kernel/drivers/$m.ko"* | head -1)
    case $f in *.xz) xz -dc "$f" ;; *.zst) zstd -qdc "$f" ;; *) cat "$f" ;; esac > "$dir/root/lib/${m##*/}.ko"
done
cp "$SRC/guest-init.sh" "$dir/root/init"; chmod +x "$dir/root/init"
(cd "$dir/root" && find . | cpio -o -H newc --quiet | gzip -1) > "$dir/initrd.gz"

say "the VM scene: a guest whose 1 GiB NVDIMM is a qcow2 image served by pmemsnap"
qemu-img create -q -f qcow2 "$dir/nvdimm.qcow2" 1G
qemu-img create -q -f qcow2 "$dir/vmstate.qcow2" 4G
echo "\$ pmemsnap serve nvdimm.qcow2 --fuse nvdimm --socket ctl.sock --qmp vm.qmp"
"$P" serve "$dir/nvdimm.qcow2" --fuse "$dir/nvdimm" --socket "$dir/ctl.sock" \
    --qmp "$dir/vm.qmp" --pidfile "$dir/d.pid"
echo "\$ qemu-system-x86_64 -machine pc,nvdimm=on ... -object memory-backend-file,share=on,mem-path=nvdimm,size=1G -device nvdimm ..."
qemu-system-x86_64 -machine pc,nvdimm=on -accel tcg -cpu qemu64 -smp 1 \
    -m 128M,slots=2,maxmem=2G -nographic -no-reboot -nodefaults \
    -kernel "$kernel" -initrd "$dir/initrd.gz" -append "console=ttyS0 quiet panic=-1" \
    -object memory-backend-file,id=nv0,share=on,mem-path="$dir/nvdimm",size=1G \
    -device nvdimm,id=nvdimm0,memdev=nv0 \
    -blockdev driver=file,filename="$dir/vmstate.qcow2",node-name=vmsfile \
    -blockdev driver=qcow2,file=vmsfile,node-name=vmstate \
    -chardev socket,id=ser0,path="$dir/serial.sock",server=on,wait=off -serial chardev:ser0 \
    -qmp unix:"$dir/vm.qmp",server=on,wait=off >"$dir/qemu.log" 2>&1 &
vmpid=$!
t0=$(date +%s%N)
python3 "$SRC/guest.py" "$dir/serial.sock" --boot
echo "guest booted (TCG) in $(ms_since "$t0") ms and sees /dev/pmem0"

say "the guest writes to its NVDIMM and remembers something in its RAM"
G "echo 'written before the snapshot' | dd of=/dev/pmem0 conv=notrunc 2>/dev/null; head -1 /dev/pmem0" \
  "echo 'RAM says: first boot, before the snapshot' > /tmp/note; cat /tmp/note"

say "a whole-VM snapshot: pmemsnap snapshot -c before --vm --socket ctl.sock"
t0=$(date +%s%N)
"$P" snapshot -c before --vm --socket "$dir/ctl.sock"
ours=$(ms_since "$t0")
"$P" stats --socket "$dir/ctl.sock" > "$dir/stats"
st=$(( $(awk '$1 == "last-vm-state-us:" { print $2 }' "$dir/stats") / 1000 ))
echo "took $ours ms: QEMU saved its own state (RAM, devices; NVDIMM skipped by x-ignore-shared) in $st ms,"
echo "pmemsnap flushed the guest's NVDIMM writes and snapshotted the image in the rest"

say "the same VM, QEMU's own savevm (copies the whole NVDIMM into its state)"
Q '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":false}]}}' >/dev/null
s0=$(stat -c %s "$dir/vmstate.qcow2")
t0=$(date +%s%N)
Q '{"execute":"human-monitor-command","arguments":{"command-line":"savevm qemu-savevm"}}' >/dev/null
qemu=$(ms_since "$t0")
s1=$(stat -c %s "$dir/vmstate.qcow2")
echo "savevm took $qemu ms and grew the vmstate disk by $(( (s1 - s0) / 1048576 )) MiB"
Q '{"execute":"human-monitor-command","arguments":{"command-line":"delvm qemu-savevm"}}' >/dev/null

say "the guest changes its NVDIMM and its RAM"
G "echo 'OVERWRITTEN after the snapshot' | dd of=/dev/pmem0 conv=notrunc 2>/dev/null; head -1 /dev/pmem0" \
  "echo 'RAM says: changed after the snapshot' > /tmp/note; cat /tmp/note"

say "revert the whole VM: pmemsnap snapshot -a before --vm --socket ctl.sock"
t0=$(date +%s%N)
"$P" snapshot -a before --vm --socket "$dir/ctl.sock"
echo "reverted in $(ms_since "$t0") ms; the guest continues from the snapshot:"
G "head -1 /dev/pmem0" "cat /tmp/note"

say "what QEMU's tools see"
echo "\$ qemu-img snapshot -l nvdimm.qcow2"
qemu-img snapshot -U -l "$dir/nvdimm.qcow2"
python3 "$SRC/guest.py" "$dir/serial.sock" "poweroff -f" >/dev/null 2>&1 || true
for _ in $(seq 100); do kill -0 "$vmpid" 2>/dev/null || break; sleep 0.1; done
vmpid=
pid=$(cat "$dir/d.pid"); kill "$pid"
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
echo "\$ qemu-img check nvdimm.qcow2"
qemu-img check "$dir/nvdimm.qcow2"
echo
echo "RESULT: whole-VM snapshot $ours ms vs QEMU savevm $qemu ms; the reverted guest read back its snapshot."
