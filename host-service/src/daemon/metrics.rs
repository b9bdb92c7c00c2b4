//! Prometheus metrics, served on `--metrics ADDR` (`GET /metrics`) when asked:
//!
//! - `ditto_vms{state="running"}`: VMs by state (every state is always present);
//! - `ditto_operation_duration_seconds{op="start",code="ok"}`: a histogram of API operations;
//! - `ditto_operations_total{op,code}`: API operations by outcome (`ok` or the gRPC code);
//! - `ditto_vm_failures_total{kind}`: VMs that ended FAILED, by the kind of end
//!   (`triple_fault`, `guest_panic`, `vcpu_failed`, `vmm_error`, `vmm_gone`).
//!
//! The recording functions write to the `metrics` facade and cost nothing without an exporter.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder};

use super::record::VmPhase;

/// Bucket bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Serves the metrics over HTTP on `addr`. Must be called inside a tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(LATENCY_BUCKETS)?
        .install()
}

/// Sets the VM counts by state.
pub fn vm_counts(states: &[VmPhase]) {
    for phase in VmPhase::ALL {
        let n = states.iter().filter(|s| **s == phase).count();
        metrics::gauge!("ditto_vms", "state" => phase.as_str()).set(n as f64);
    }
}

/// Records one API operation.
pub fn operation(op: &'static str, code: &'static str, took: Duration) {
    metrics::histogram!("ditto_operation_duration_seconds", "op" => op, "code" => code)
        .record(took.as_secs_f64());
    metrics::counter!("ditto_operations_total", "op" => op, "code" => code).increment(1);
}

/// Counts a VM that ended FAILED, by the kind of end.
pub fn vm_failure(kind: &str) {
    metrics::counter!("ditto_vm_failures_total", "kind" => kind.to_owned()).increment(1);
}
