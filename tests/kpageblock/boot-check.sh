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
# Init of the check guest: read a file into the page cache, scan, check; a dirty file; readers
# racing with writes, truncation and reclaim; end the VM.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
echo "guest kernel $(uname -r)"
ls -l /proc/kpageblock
cat /usr/sbin/ditto-agent > /dev/null
ditto-agent scan --method walk --json > /tmp/scan.json
/usr/bin/kpageblock-check /usr/sbin/ditto-agent /dev/vda --agent-json /tmp/scan.json
clean=$?
# Walk against fast path over the same page cache, three times each, alternating.
cat /usr/bin/* /usr/sbin/* /bin/* > /dev/null 2>&1
for i in 1 2 3; do
    for m in walk kpageblock; do
        echo "scan $m: $(ditto-agent scan --method $m | grep -E '^method|reported')"
    done
done
# A file unlinked while open keeps its page cache, which only the fast path can see.
head -c 1048576 /dev/urandom > /kpb-unlinked
sync
exec 3< /kpb-unlinked
cat /kpb-unlinked > /dev/null
rm /kpb-unlinked
/usr/bin/kpageblock-check /proc/self/fd/3 /dev/vda || clean=1
exec 3<&-
# A file just written and not yet written back: its pages are dirty and have no record.
dd if=/dev/urandom of=/kpb-dirty bs=4096 count=64 2>/dev/null
/usr/bin/kpageblock-check --expect-none /kpb-dirty /dev/vda
dirty=$?
# Readers racing with writes, truncation and reclaim must not upset the kernel.
before=$(dmesg | grep -c "BUG\|Oops\|WARNING")
for r in 1 2; do
    (i=0; while [ $i -lt 30 ]; do dd if=/proc/kpageblock of=/dev/null bs=65536 2>/dev/null || echo read failed; i=$((i + 1)); done) &
done
i=0
while [ $i -lt 15 ]; do
    dd if=/dev/urandom of=/kpb-churn bs=65536 count=16 2>/dev/null
    sync
    cat /kpb-churn > /dev/null
    rm /kpb-churn
    echo 3 > /proc/sys/vm/drop_caches
    i=$((i + 1))
done
wait
after=$(dmesg | grep -c "BUG\|Oops\|WARNING")
echo "stress: 2 readers x 30 full reads beside 15 write/truncate/drop_caches rounds, kernel warnings $before -> $after"
test "$after" = "$before" || clean=1
echo "kpageblock-check exit $((clean + dirty))"
reboot -f
GUEST
debugfs -w "$work/rootfs.ext4" >/dev/null <<CMDS
write $musl/kpageblock-check usr/bin/kpageblock-check
sif usr/bin/kpageblock-check mode 0100755
write $work/check.sh etc/kpageblock-check.sh
sif etc/kpageblock-check.sh mode 0100755
CMDS

flock /tmp/ditto-box.lock cargo xtask box --timeout 600 -- \
    ditto-vmm run --kernel "$images/vmlinuz-ditto" \
    --cmdline "console=ttyS0 reboot=acpi panic=-1 pci=off init_on_alloc=0 root=/dev/vda rw init=/etc/kpageblock-check.sh" \
    --vcpus 2 --mem-mib 256 --drive "id=root,path=$work/rootfs.ext4" --console stdout \
    | tee "$work/console.log"
grep -q "kpageblock-check exit 0" "$work/console.log"
