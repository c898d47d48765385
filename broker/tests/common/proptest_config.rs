//! The model tests' proptest settings, shared by including this file alone
//! (`#[path = "common/proptest_config.rs"]`), without the rest of `common`.

use proptest::test_runner::{Config, FileFailurePersistence};

/// `default_cases` unless `PROPTEST_CASES` says otherwise (an explicit `cases`
/// would hide the environment's, so it is read here), with failures saved to
/// `regressions` (a path from the crate's root) to be replayed first.
pub fn model_config(default_cases: u32, regressions: &'static str) -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default_cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
        ..Config::default()
    }
}
