//! KVM smoke test: a hand-assembled guest writes known pages and KVM_GET_DIRTY_LOG must report
//! each of them. Runs against the local /dev/kvm and, under `cargo xtask test`, inside the box.

use ditto_tests::payload::{MARKER, TinyVm};

/// Checks that every page in `written` is in `reported`; names any extra page KVM reported.
fn check(round: &str, written: &[u64], reported: &[u64]) {
    let missing: Vec<_> = written.iter().filter(|p| !reported.contains(p)).collect();
    assert!(
        missing.is_empty(),
        "{round}: KVM_GET_DIRTY_LOG missed written pages {missing:?} (reported {reported:?})"
    );
    let extra: Vec<_> = reported.iter().filter(|p| !written.contains(p)).collect();
    if extra.is_empty() {
        println!("{round}: dirty log is exact: {reported:?}");
    } else {
        // Extra pages are safe for ditto (it saves more than needed), so they are reported, not
        // failed; a missed page above is the failure that matters.
        println!("{round}: dirty log has pages nobody wrote: {extra:?} (written {written:?})");
    }
}

#[test]
fn dirty_log_reports_the_pages_the_guest_wrote() {
    let mut vm = TinyVm::new().expect("create a VM on /dev/kvm");

    let first = [3, 5, 9, 15];
    let reported = vm.write_pages(1, &first).expect("run the first payload");
    for &page in &first {
        assert_eq!(vm.marker_in(page).expect("read guest memory"), MARKER);
    }
    check("round 1", &first, &reported);

    // The log was cleared by the fetch: a second run that writes other pages must report those,
    // and not the pages of the first round again.
    let second = [7, 12];
    let reported = vm.write_pages(2, &second).expect("run the second payload");
    check("round 2", &second, &reported);
    for page in first {
        assert!(
            !reported.contains(&page),
            "round 2: page {page} from round 1 is still dirty: the log was not cleared"
        );
    }

    // Nothing ran since: the log must be empty.
    let idle = vm.dirty_pages().expect("fetch the dirty log");
    assert!(idle.is_empty(), "idle VM reported dirty pages {idle:?}");
}
