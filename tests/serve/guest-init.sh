#!/bin/busybox sh
# /init of the test guest's initramfs: load the NVDIMM drivers, then run
# the commands the host sends on the serial line, one per line, answering
# each with "@@rc=N".
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp && mount -t tmpfs tmp /tmp
for m in libnvdimm nd_btt nd_pmem nfit; do insmod /lib/$m.ko || echo "@@insmod $m failed"; done
for i in $(seq 100); do [ -b /dev/pmem0 ] && break; sleep 0.1; done
stty -F /dev/ttyS0 -echo raw 2>/dev/null
echo "@@boot pmem=$([ -b /dev/pmem0 ] && echo yes || echo no)" > /dev/ttyS0
while read -r line < /dev/ttyS0; do
    sh -c "$line" > /dev/ttyS0 2>&1
    echo "@@rc=$?" > /dev/ttyS0
done
