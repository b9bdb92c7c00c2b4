#!/bin/sh
# Boot check of the patched guest kernel (`cargo xtask kernel`): boots vmlinuz-ditto under
# ditto-vmm with real KVM in the KVM test box, without an initramfs, on a copy of the guest root
# disk that also holds `kpageblock-check` and a guest script, and checks /proc/kpageblock there
# (tests/src/bin/kpageblock-check.rs: records against the disk bytes and the agent's walk).
# Run from the workspace root; it takes the box lock so that it never runs beside another box.
set -eu
images=${DITTO_IMAGES:-$PWD/target/ditto-images/guest}
work=$PWD/target/kpageblock-check
musl=$PWD/target/x86_64-unknown-linux-musl/release
for f in vmlinuz-ditto rootfs.ext4; do
    test -f "$images/$f" || { echo "no $images/$f: run cargo xtask kernel and cargo xtask images" >&2; exit 2; }
done

cargo build --quiet --release --target x86_64-unknown-linux-musl -p ditto-tests --bin kpageblock-check
mkdir -p "$work"
cp --sparse=always "$images/rootfs.ext4" "$work/rootfs.ext4"
cat > "$work/check.sh" <<'GUEST'
#!/bin/sh
# Init of the check guest: read a file into the page cache, scan, check, power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
echo "guest kernel $(uname -r)"
ls -l /proc/kpageblock
cat /usr/sbin/ditto-agent > /dev/null
ditto-agent scan --json > /tmp/scan.json
ditto-agent scan | tail -1
/usr/bin/kpageblock-check /usr/sbin/ditto-agent /dev/vda --agent-json /tmp/scan.json
echo "kpageblock-check exit $?"
poweroff -f
GUEST
debugfs -w "$work/rootfs.ext4" >/dev/null <<CMDS
write $musl/kpageblock-check usr/bin/kpageblock-check
sif usr/bin/kpageblock-check mode 0100755
write $work/check.sh etc/kpageblock-check.sh
sif etc/kpageblock-check.sh mode 0100755
CMDS

flock /tmp/ditto-box.lock cargo xtask box --timeout 600 -- \
    ditto-vmm run --kernel "$images/vmlinuz-ditto" \
    --cmdline "console=ttyS0 reboot=acpi panic=-1 pci=off init_on_alloc=0 root=/dev/vda ro init=/etc/kpageblock-check.sh" \
    --vcpus 1 --mem-mib 256 --drive "id=root,path=$work/rootfs.ext4,ro" --console stdout \
    | tee "$work/console.log"
grep -q "kpageblock-check exit 0" "$work/console.log"
