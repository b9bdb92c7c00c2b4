#!/bin/busybox sh
# The KVM test box's /init: load KVM and the virtio modules, mount the shared folders, run the
# command that `cargo xtask box` left in the control folder, report its status, power off.
# Kernel command line: ditto.shares=TAG:PATH,… ditto.net=1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd
# ttyS1 carries the command's output to `cargo xtask box`: no newline translation.
stty -F /dev/ttyS1 raw -echo 2>/dev/null
out=/dev/ttyS1

for m in $MODULES; do
	modprobe "$m" 2>/dev/null || echo "box: modprobe $m failed"
done

ctl=/run/ditto-box
mkdir -p "$ctl"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 ctl "$ctl"; then
	echo "box: cannot mount the control folder (9p)" >"$out"
	poweroff -f
fi

fail() {
	echo "$1" >"$ctl/error"
	echo "${2:-125}" >"$ctl/status"
	sync
	poweroff -f
}

shares=
net=0
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	ditto.shares=*) shares="${arg#ditto.shares=}" ;;
	ditto.net=1) net=1 ;;
	esac
done
for share in $(echo "$shares" | tr ',' ' '); do
	tag="${share%%:*}"
	path="${share#*:}"
	mkdir -p "$path"
	mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none "$tag" "$path" ||
		fail "box: cannot mount the shared folder $path"
done

[ -c /dev/kvm ] || fail "box: /dev/kvm is missing in the box ($(dmesg | grep -i -m1 -E 'kvm|svm' || echo 'kvm_amd did not load')); the box needs a QEMU whose emulated EPYC CPU has SVM (Debian's qemu-system-x86 7.2 or later)"

if [ "$net" = 1 ]; then
	ip link set lo up
	ip link set eth0 up || fail "box: no network device (virtio_net) in the box"
	ip addr add 10.0.2.15/24 dev eth0
	ip route add default via 10.0.2.2
else
	ip link set lo up
fi

cd /tmp
sh "$ctl/cmd" </dev/null >"$out" 2>&1
echo "$?" >"$ctl/status"
sync
poweroff -f
