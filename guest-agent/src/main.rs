//! `ditto-agent`: the guest half of ditto.

fn main() {
    println!("ditto-agent {}", env!("CARGO_PKG_VERSION"));
}
