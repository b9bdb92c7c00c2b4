//! The agent in a real guest (the stock Debian cloud kernel under QEMU's microvm, software
//! emulation): on a partitioned virtio disk, every extent it reports must name the whole disk by
//! its virtio serial and give offsets on the whole disk (the partition's start added), and the
//! disk bytes there must be exactly the page the guest cached. Run by `cargo xtask test`.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use ditto_tests::fixture::{FixtureFile, PAGE, page_content, page_identity, partitioned_ext4};
use ditto_tests::microvm::{Disk, boot_until, images_dir};

const END: &str = "DITTO-JSON-END";

#[test]
#[ignore = "needs the guest images ($DITTO_IMAGES) and QEMU; `cargo xtask test` runs it"]
fn partitioned_disk_extents_are_whole_disk_offsets_of_the_cached_pages() {
    let images = images_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("data.img");
    let files = [
        FixtureFile {
            full_pages: 64,
            tail: 0,
        },
        FixtureFile {
            full_pages: 300,
            tail: 0,
        },
        FixtureFile {
            full_pages: 5,
            tail: 100,
        },
        FixtureFile {
            full_pages: 0,
            tail: 2000,
        },
    ];
    partitioned_ext4(&image, 64, &files).unwrap();

    let script = concat!(
        "init=/bin/sh quiet loglevel=1 -- -c \"",
        "mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev; ",
        "mkdir -p /tmp/data; mount -o ro /dev/vdb1 /tmp/data; ",
        "cat /tmp/data/* >/dev/null; ",
        // Fresh pages reach the LRU lists (and the report) only when the CPU's batch of new
        // pages fills up: 2 MiB of tmpfs pages flush it.
        "mkdir -p /tmp/fill; mount -t tmpfs fill /tmp/fill; ",
        "head -c 2097152 /dev/zero >/tmp/fill/x; echo DITTO-JSON-BEGIN; ",
        "/usr/sbin/ditto-agent scan --json --path /tmp/data; echo DITTO-JSON-END; poweroff -f\""
    );
    let console = boot_until(
        &images,
        &[Disk {
            path: &image,
            serial: "data",
        }],
        script,
        END,
        Duration::from_secs(300),
    )
    .unwrap();
    let begin = console
        .iter()
        .position(|l| l.contains("DITTO-JSON-BEGIN"))
        .expect("the guest printed no report");
    let json: String = console[begin + 1..console.len() - 1].join("\n");
    let report: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{json}"));

    let disks = report["disks"].as_array().expect("disks");
    let data = disks
        .iter()
        .find(|d| d["id"] == "data")
        .unwrap_or_else(|| panic!("no disk with id \"data\" in {disks:?}"));
    assert_eq!(
        data["path"], "/dev/vdb",
        "the disk is the whole disk: {data}"
    );
    assert_eq!(data["size_bytes"], 64u64 << 20, "{data}");

    let disk = File::open(&image).unwrap();
    let mut seen = BTreeSet::new();
    let extents = report["cache_extents"].as_array().expect("cache_extents");
    for extent in extents {
        assert_eq!(
            extent["disk"], "data",
            "only the data disk was scanned: {extent}"
        );
        let offset = extent["offset"].as_u64().expect("offset");
        let pages = extent["pages"].as_u64().expect("pages");
        assert!(pages > 0 && offset % 512 == 0, "{extent}");
        for k in 0..pages {
            let mut block = vec![0u8; PAGE];
            disk.read_exact_at(&mut block, offset + k * PAGE as u64)
                .unwrap();
            let (file, page) = page_identity(&block).unwrap_or_else(|| {
                panic!("extent {extent} page {k}: the disk there holds no fixture page")
            });
            let spec = files.get(file as usize).expect("a fixture file");
            assert!(
                page < spec.full_pages,
                "extent {extent}: page {page} of file {file} is a partial last page"
            );
            assert_eq!(block, page_content(file, page), "extent {extent} page {k}");
            assert!(
                seen.insert((file, page)),
                "page ({file}, {page}) reported twice"
            );
        }
    }
    let expected: usize = files.iter().map(|f| f.full_pages as usize).sum();
    assert_eq!(
        seen.len(),
        expected,
        "every whole page of the files the guest read must be reported"
    );
    println!(
        "{} extents, {} pages, all verified against the disk image",
        extents.len(),
        seen.len()
    );
}
