#!/bin/busybox sh
# ditto guest initramfs: load the virtio modules, mount the root disk, switch to it.
# Kernel command line: root=DEV|UUID=…|LABEL=… (default /dev/vda), rootfstype= (ext4),
# rootflags=, ro|rw (rw), rootdelay=SECONDS to wait for the disk (10), init=PATH (/sbin/init);
# arguments after `--` on the command line are passed on to that init.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for m in $MODULES; do
	modprobe "$m" || echo "initramfs: modprobe $m failed"
done

root=/dev/vda fstype=ext4 flags= mode=rw init=/sbin/init delay=10
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	--) break ;; # what follows belongs to init
	root=*) root="${arg#root=}" ;;
	rootfstype=*) fstype="${arg#rootfstype=}" ;;
	rootflags=*) flags="${arg#rootflags=}" ;;
	rootdelay=*) delay="${arg#rootdelay=}" ;;
	init=*) init="${arg#init=}" ;;
	ro) mode=ro ;;
	rw) mode=rw ;;
	esac
done

rescue() {
	echo "initramfs: $*"
	echo "initramfs: dropping to a shell; the machine powers off when it exits"
	sh
	poweroff -f
}

tries=$((delay * 10))
while :; do
	case "$root" in
	UUID=* | LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
	*) dev="$root" ;;
	esac
	[ -n "$dev" ] && [ -b "$dev" ] && break
	tries=$((tries - 1))
	[ "$tries" -gt 0 ] || rescue "root device $root did not appear within ${delay}s"
	usleep 100000
done

opts="$mode"
[ -n "$flags" ] && opts="$opts,$flags"
mount -t "$fstype" -o "$opts" "$dev" /newroot || rescue "cannot mount $dev ($fstype, $opts)"
[ -x "/newroot$init" ] || [ -L "/newroot$init" ] || rescue "no init $init on $dev"

mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /sys /proc
exec switch_root /newroot "$init" "$@"
