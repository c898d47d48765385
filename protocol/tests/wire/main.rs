//! Codec tests for tidings-protocol: round trips, truncation, malformed input,
//! PROTOCOL.md's hex examples and property tests, in one test binary.

mod malformed;
mod properties;
mod roundtrip;
mod samples;
mod spec;
mod strategies;
