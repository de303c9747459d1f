#!/bin/bash
say() { echo "PROBE: $*" > /dev/kmsg; }
U=/work/nbd-wip/.venv/bin/ublkd
mkdir -p /run/t /var/tmp/t /etc/ublkd; cd /var/tmp/t
truncate -s 256M r.img
startq() { rm -f /run/t/r.sock; setsid qemu-nbd -t -e 0 -f raw -k /run/t/r.sock r.img </dev/null >/tmp/qn.log 2>&1 & for i in $(seq 50); do [ -S /run/t/r.sock ] && break; sleep 0.1; done; }
startq
printf 'backend = "nbd"\nuri = "nbd+unix:///?socket=/run/t/r.sock"\nqueues = 1\nreconnect_timeout = 0\n' > /etc/ublkd/nv.toml
setsid $U serve nv >/tmp/serve.log 2>&1 < /dev/null &
for i in $(seq 60); do $U status nv --json 2>/dev/null | grep -q '"state": "LIVE"' && break; sleep 0.5; done
dev=/dev/ublkb0; say "live"
pkill -KILL qemu-nbd; say "server killed (idle)"; sleep 2
(timeout 100 dd if=$dev of=/dev/null bs=4k count=1 iflag=direct status=none; say "held read rc=$?") &
sleep 2; startq; say "server back"
sleep 8
say "ss: $(ss -xp 2>/dev/null | grep -c r.sock) sockets; qemu-nbd log: $(tail -2 /tmp/qn.log | tr '\n' ' ')"
pid=$(pgrep -f "ublkd serve nv" | tail -1)
for t in /proc/$pid/task/*; do say "task $(basename $t) $(cat $t/wchan) $(cat $t/comm)"; done
while read -r l; do say "LOG $l"; done < /tmp/serve.log
say "strace:"; timeout 3 strace -f -p $pid -e trace=io_uring_enter,connect,socket 2>&1 | head -20 | while read -r l; do say "ST $l"; done
exit 0
