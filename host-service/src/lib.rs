//! ditto's host half: the KVM microVM monitor (`ditto-vmm`), the orchestration daemon (`dittod`)
//! and its CLI (`dittoctl`).
