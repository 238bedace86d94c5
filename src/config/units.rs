//! The units config values are written in: sizes (`"16MiB"`) and durations
//! (`"250ms"`, `"10m"`).
//!
//! This module owns parsing and printing those strings; which values are allowed
//! for which setting (e.g. "greater than zero", "at most 7 days") is decided in
//! `validate`.

use std::{fmt, str::FromStr, time::Duration};

/// A size in bytes, written in config as `"16MiB"`, `"10MB"`, `"512KiB"` or `"1024"`.
///
/// Binary (`KiB`, `MiB`, `GiB`, …) and decimal (`KB`, `MB`, `GB`, …) units are
/// accepted, case-insensitively. `Display` prints the exact size in the largest
/// unit that divides it, so it parses back to the same value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// Units `Display` may use, largest first within each family.
const UNITS: [(&str, u64); 9] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

impl ByteSize {
    /// The size in bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The size in bytes, saturated to `usize` (for buffer limits).
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    /// Parses a size; the error is a lower-case message naming the value.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.trim()
            .parse::<bytesize::ByteSize>()
            .map(|size| Self(size.as_u64()))
            .map_err(|_| format!("not a valid size: {text:?}"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match UNITS.iter().find(|(_, factor)| self.0 != 0 && self.0.is_multiple_of(*factor)) {
            Some((unit, factor)) => write!(f, "{}{unit}", self.0 / factor),
            None => write!(f, "{}B", self.0),
        }
    }
}

/// Parses a duration such as `"250ms"`, `"30s"`, `"10m"`, `"1h"` or `"1h 30m"`.
///
/// The error is a lower-case message naming the value.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| format!("not a valid duration: {text:?}"))
}

/// Prints a duration as config text in the largest unit that divides it (`"7d"`,
/// `"90s"`, `"250ms"`), so it parses back to the same value.
pub fn format_duration(duration: Duration) -> String {
    const UNITS: [(&str, u128); 6] = [
        ("d", 86_400_000_000_000),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ];
    let nanos = duration.as_nanos();
    match UNITS.iter().find(|(_, factor)| nanos != 0 && nanos.is_multiple_of(*factor)) {
        Some((unit, factor)) => format!("{}{unit}", nanos / factor),
        None => format!("{nanos}ns"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        let cases = [
            ("16MiB", 16 << 20),
            ("10MB", 10_000_000),
            ("512KiB", 512 << 10),
            ("1024", 1024),
            ("1 GiB", 1 << 30),
            ("256mib", 256 << 20),
            ("0", 0),
        ];
        for (text, bytes) in cases {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn bad_sizes_name_the_value() {
        for text in ["", "MiB", "-1", "ten MiB", "16 parsecs"] {
            assert_eq!(text.parse::<ByteSize>(), Err(format!("not a valid size: {text:?}")));
        }
    }

    #[test]
    fn sizes_print_exactly_and_round_trip() {
        for (bytes, text) in [
            (16 << 20, "16MiB"),
            (1 << 40, "1TiB"),
            (256 << 20, "256MiB"),
            (10_000_000, "10MB"),
            (3072, "3KiB"),
            (1536, "1536B"),
            (1000, "1KB"),
            (1001, "1001B"),
            (0, "0B"),
        ] {
            assert_eq!(ByteSize(bytes).to_string(), text);
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)));
        }
    }

    #[test]
    fn durations_parse_with_humantime() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("ten minutes"), Err(r#"not a valid duration: "ten minutes""#.to_string()));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn durations_print_exactly_and_round_trip() {
        for (duration, text) in [
            (Duration::from_secs(7 * 86_400), "7d"),
            (Duration::from_secs(365 * 86_400), "365d"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_micros(1500), "1500us"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::ZERO, "0ns"),
        ] {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration));
        }
    }
}
