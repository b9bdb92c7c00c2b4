#!/bin/sh
# Sequential read throughput of a guest's virtio-blk disk under ditto-vmm and under QEMU's
# virtio-blk (microvm machine, KVM), same kernel, same images, same host, one run; prints MB/s
# of each and their ratio. Runs inside the KVM test box, which needs the host's /usr for QEMU:
#
#   cargo xtask box --share /usr -- tests/bench/blk-throughput.sh [MiB]
set -eu
mib=${1:-256}
img=$DITTO_IMAGES
work=$(mktemp -d)
# QEMU from the shared /usr needs the host's dynamic loader.
mkdir -p /lib64
ln -sf /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu

dd if=/dev/urandom of="$work/data.img" bs=1M count="$mib" 2>/dev/null
# Two cold reads of the whole data disk (the guest's cache dropped before each), timed with the
# guest's /proc/uptime (busybox dd prints no rate).
guest='mount -t proc proc /proc; for i in 1 2; do echo 3 > /proc/sys/vm/drop_caches; read a x < /proc/uptime; dd if=/dev/vdb of=/dev/null bs=1M 2>/dev/null; read b x < /proc/uptime; echo ddtime $a $b; done; poweroff -f'
cmdline="console=ttyS0 quiet panic=-1 root=/dev/vda ro init=/bin/sh -- -c \"$guest\""

ditto-vmm run --kernel "$img/vmlinuz" --initrd "$img/initramfs.img" --cmdline "$cmdline pci=off" \
	--vcpus 1 --mem-mib 512 --drive "id=root,path=$img/rootfs.ext4,ro" \
	--drive "id=data,path=$work/data.img,ro" --console "$work/ditto.log"
/usr/bin/qemu-system-x86_64 -M microvm,acpi=on -accel kvm -cpu host -smp 1 -m 512 \
	-nographic -no-reboot -kernel "$img/vmlinuz" -initrd "$img/initramfs.img" \
	-append "$cmdline" \
	-drive "id=root,file=$img/rootfs.ext4,format=raw,if=none,readonly=on" \
	-device virtio-blk-device,drive=root \
	-drive "id=data,file=$work/data.img,format=raw,if=none,readonly=on" \
	-device virtio-blk-device,drive=data >"$work/qemu.log" 2>&1

# Seconds of each read; throughput from the byte count.
secs() { grep '^ddtime' "$1" | awk '{ printf "%.2f\n", $3 - $2 }'; }
bytes=$((mib * 1048576))
echo "ditto-vmm reads (s): $(secs "$work/ditto.log" | tr '\n' ' ')"
echo "qemu reads (s):      $(secs "$work/qemu.log" | tr '\n' ' ')"
d=$(secs "$work/ditto.log" | tail -1)
q=$(secs "$work/qemu.log" | tail -1)
awk -v b="$bytes" -v d="$d" -v q="$q" 'BEGIN {
	printf "second read of %d MiB: ditto-vmm %.1f MB/s, qemu %.1f MB/s, ditto/qemu = %.2f\n",
		b / 1048576, b / d / 1e6, b / q / 1e6, q / d }'
rm -rf "$work"
