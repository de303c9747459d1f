#!/bin/busybox sh
# /init of the test-bed initramfs: mount the host's root file system (9p,
# read-only) under a tmpfs overlay and hand over to systemd.
#
# Kernel command line parameters read here:
#   testbed.modules=DIR   the unpacked kernel's module tree, a path on the
#                         host root; bind-mounted at /lib/modules/$(uname -r)
#
# The kernel boots with maxcpus=1 (guest.py); the other vCPUs are brought
# online here, once the kernel's late initcalls are done.  Among those,
# sched_clock marks itself stable by patching its jump label; with a second
# vCPU running, qemu's multi-threaded TCG now and then let that CPU execute
# the half-patched int3 and the kernel panicked at boot ("Oops: int3" in
# sched_clock_cpu, docs/testbed.md).
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "testbed-init: $*" >&2
    # -no-reboot makes qemu exit on the panic that follows, so the host
    # sees a dead guest at once instead of waiting for its boot timeout.
    exec poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for online in /sys/devices/system/cpu/cpu*/online; do
    [ "$(cat "$online")" = 1 ] || echo 1 > "$online" || fail "cannot online ${online%/online}"
done

modules_dir=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        testbed.modules=*) modules_dir="${arg#testbed.modules=}" ;;
    esac
done

for module in $(cat /modules/load-order); do
    insmod "/modules/$module.ko" || fail "insmod $module failed"
done

mkdir -p /lower /rw
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose root /lower \
    || fail "cannot mount the host root (9p tag 'root')"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount the overlay tmpfs"
mkdir -p /rw/upper /rw/work
cp -a /overlay/. /rw/upper/
# The host root carries /.dockerenv; systemd would then believe it runs in
# a container and ignore the kernel command line.  A whiteout hides it.
mknod /rw/upper/.dockerenv c 0 0
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || fail "cannot mount the overlay root"

if [ -n "$modules_dir" ]; then
    release=$(uname -r)
    mkdir -p "/newroot/lib/modules/$release"
    mount --bind "/newroot$modules_dir" "/newroot/lib/modules/$release" \
        || fail "cannot bind the module tree $modules_dir"
fi

# A fresh /run: the host's runtime state must not leak into the guest.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /lib/systemd/systemd
