//! The tidings client library (filled in by the client issue).
