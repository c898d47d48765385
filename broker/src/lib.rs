//! The tidings broker library (filled in by the broker issue).
