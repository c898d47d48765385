//! Parsing durations (`500ms`, `5s`, `2m`, `1h 30m`) and byte sizes (`64KiB`,
//! `1MiB`) for the CLI's flags, with the same crates (`humantime`, `bytesize`) and
//! rules as the broker's configuration.

use std::time::Duration;

/// Parses numbers with units (`ms`, `s`, `m`, `h`, …, as `humantime` reads them).
/// A bare number is refused, so that `--ttl 5` cannot silently mean milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("`{s}` is not a duration ({e})"))
}

/// Parses a byte size: a number with an optional unit, binary (`KiB`, `MiB`) or
/// decimal (`KB` = 1,000, `MB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 65536, 512KiB or 1MiB"))?;
    match size.as_u64() {
        u64::MAX => Err(format!("size `{s}` is too large")),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn refuses_bad_input() {
        for bad in ["", "5", "ms", "5x", "-5s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be refused");
        }
    }
}
