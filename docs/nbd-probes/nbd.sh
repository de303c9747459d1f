#!/bin/bash
mkdir -p /run/t /var/tmp/t; cd /var/tmp/t
qemu-img create -q -f qcow2 q.qcow2 256M; truncate -s 256M r.img n.img
for e in 1 0; do
  qemu-nbd -t -e $e -f qcow2 --cache=writethrough -k /run/t/q$e.sock q.qcow2 >/dev/null 2>&1 & sleep 2
  echo "== qemu-nbd -e $e"; nbdinfo "nbd+unix:///?socket=/run/t/q$e.sock" | grep -E "can_multi_conn|can_fua|can_flush|can_trim|can_zero|block_size|export-size|is_read_only"
done
nbdkit -U /run/t/m.sock memory 256M >/dev/null 2>&1; sleep 1
echo "== nbdkit memory"; nbdinfo "nbd+unix:///?socket=/run/t/m.sock" | grep -E "can_multi_conn|can_fua|block_size"
cat > /run/t/nbd.conf <<'C'
[generic]
    listenaddr = 127.0.0.1
    port = 10810
[vol]
    exportname = /var/tmp/t/n.img
    flush = true
    fua = true
    trim = true
C
nbd-server -C /run/t/nbd.conf -p /run/t/nbd.pid >/dev/null 2>&1; sleep 1
echo "== nbd-server"; nbdinfo nbd://127.0.0.1:10810/vol | grep -E "can_multi_conn|can_fua|can_flush|can_trim|block_size|export-size"
nbdinfo nbd://127.0.0.1:10810/nope 2>&1 | head -2
echo "== fio nbd engine"; fio --enghelp 2>/dev/null | grep -w nbd
systemctl is-active nbd-server; systemctl status nbd-server --no-pager 2>&1 | head -3
pkill qemu-nbd; pkill nbdkit; pkill nbd-server; sleep 1; echo done
