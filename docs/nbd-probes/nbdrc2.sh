#!/bin/bash
say() { echo "PROBE: $*" > /dev/kmsg; echo "$*"; }
U=/work/nbd-wip/.venv/bin/ublkd
mkdir -p /run/t /var/tmp/t /etc/ublkd; cd /var/tmp/t
truncate -s 256M r.img
startq() { rm -f /run/t/r.sock; setsid qemu-nbd -t -e 0 -f raw -k /run/t/r.sock r.img </dev/null >/tmp/qn.log 2>&1 & for i in $(seq 50); do [ -S /run/t/r.sock ] && break; sleep 0.1; done; }
startq
printf 'backend = "nbd"\nuri = "nbd+unix:///?socket=/run/t/r.sock"\nqueues = 2\nreconnect_timeout = 8\n' > /etc/ublkd/nv.toml
setsid $U serve nv >/tmp/serve.log 2>&1 < /dev/null &
for i in $(seq 60); do $U status nv --json 2>/dev/null | grep -q '"state": "LIVE"' && break; sleep 0.5; done
dev=/dev/ublkb0; say "live"
(timeout 200 fio --name=v --filename=$dev --rw=randwrite --bs=4k --size=16M --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 --output-format=terse > /tmp/fio.log 2>&1; echo "fio rc=$?" > /tmp/fio.rc) &
fiopid=$!
sleep 3; pkill -KILL qemu-nbd; say "server killed"; sleep 3; startq; say "server back"
wait $fiopid; say "$(cat /tmp/fio.rc)"; cut -d';' -f1-5 /tmp/fio.log | head -2
tail -3 /tmp/serve.log
say "past timeout test"
pkill -KILL qemu-nbd; t0=$(date +%s)
timeout 30 dd if=$dev of=/dev/null bs=4k count=1 iflag=direct status=none; say "read rc=$? after $(( $(date +%s) - t0 )) s"
startq; sleep 2
timeout 30 dd if=$dev of=/dev/null bs=4k count=1 skip=200 iflag=direct status=none; say "read after server back rc=$?"
pkill -TERM -f "ublkd serve nv"; sleep 5; say "stopped"; tail -3 /tmp/serve.log; pkill qemu-nbd; echo end
