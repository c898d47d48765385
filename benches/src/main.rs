//! tidings-bench.
fn main() {}
