#!/bin/bash
U=/work/nbd-wip/.venv/bin/ublkd
mkdir -p /run/t /var/tmp/t /etc/ublkd; cd /var/tmp/t
truncate -s 256M r.img
qemu-nbd -t -e 0 -f raw -k /run/t/r.sock r.img >/tmp/qn.log 2>&1 &
sleep 2
printf 'backend = "nbd"\nuri = "nbd+unix:///?socket=/run/t/r.sock"\nqueues = 2\n' > /etc/ublkd/nv.toml
setsid $U serve nv >/tmp/serve.log 2>&1 < /dev/null &
for i in $(seq 60); do $U status nv --json 2>/dev/null | grep -q '"state": "LIVE"' && break; sleep 0.5; done
$U status nv; cat /tmp/serve.log
dev=$($U status nv --json | sed -n 's/.*"device": "\(.*\)".*/\1/p')
echo "device $dev"; cat /sys/block/$(basename $dev)/queue/write_cache /sys/block/$(basename $dev)/queue/discard_max_bytes
head -c 4M /dev/urandom > /tmp/p; timeout 60 dd if=/tmp/p of=$dev bs=1M oflag=direct status=none; echo "dd rc=$?"
timeout 60 cmp -n 4194304 /tmp/p $dev && echo "readback OK"
timeout 60 cmp -n 4194304 /tmp/p r.img && echo "backing file OK"
timeout 300 fio --name=v --filename=$dev --rw=randwrite --bs=4k --size=16M --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 --output-format=terse >/tmp/fio.log 2>&1; echo "fio rc=$?"
timeout 300 fio --name=r --filename=$dev --rw=randread --bs=4k --size=64M --ioengine=io_uring --iodepth=32 --direct=1 --runtime=5 --time_based 2>&1 | grep -E "IOPS" | head -2
pkill -9 -f "ublkd serve nv"; sleep 1
setsid $U serve nv >/tmp/serve2.log 2>&1 < /dev/null &
for i in $(seq 60); do $U status nv --json 2>/dev/null | grep -q '"state": "LIVE"' && break; sleep 0.5; done
cat /tmp/serve2.log; timeout 60 cmp -n 4194304 /tmp/p r.img && echo "after recovery backing OK"
timeout 60 dd if=$dev of=/dev/null bs=4k count=1 iflag=direct status=none && echo "read after recovery OK"
pkill -TERM -f "ublkd serve nv"; sleep 3; $U list; pkill qemu-nbd; echo end
