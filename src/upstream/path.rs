//! The one spelling of a request path that the gateway decides on and the upstream
//! gets.
//!
//! Routing, the model allowlist, the token estimate and the cache must act on the
//! path the upstream will act on. Upstreams (nginx, most application servers) decode
//! and normalise paths before they route, so `/v1/%63hat/completions` is chat
//! completions to them and `/v1/..%2f..%2fadmin` climbs out of the base path.
//! [`normalize`] therefore decodes what every server decodes the same way (the
//! unreserved characters, RFC 3986 §2.3) and refuses what servers disagree on: an
//! encoded `/` or `\`, a raw `\`, dot segments in any spelling, `;` path parameters,
//! an encoded `%` (double encoding), control characters, and empty segments. What it
//! returns is sent upstream as it is, so there is nothing left for the upstream to
//! read differently.

use std::fmt;

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an absolute path (`*`, or no leading `/`).
    NotAbsolute,
    /// `//`, or a trailing `/`.
    EmptySegment,
    /// `.` or `..`, however encoded.
    DotSegment,
    /// `%2F` or `%5C` (`/`, `\`), or a raw `\`.
    Slash,
    /// `;` (path parameters), raw or encoded.
    Parameter,
    /// `%25`: an encoded `%`, which a server that decodes twice would read again.
    EncodedPercent,
    /// A control character (`%00` to `%1F`, `%7F`), a space or a non-ASCII byte.
    Unprintable,
    /// A `%` not followed by two hex digits.
    BadEscape,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAbsolute => "not an absolute path",
            Self::EmptySegment => "empty path segment (`//` or a trailing `/`)",
            Self::DotSegment => "`.` or `..` path segment",
            Self::Slash => "encoded `/` or a `\\` in a path segment",
            Self::Parameter => "`;` in a path segment",
            Self::EncodedPercent => "encoded `%` in a path segment",
            Self::Unprintable => "control, space or non-ASCII character in a path segment",
            Self::BadEscape => "`%` not followed by two hex digits",
        })
    }
}

/// `path` in its normal form: escapes of unreserved characters decoded, every other
/// escape kept with upper-case hex digits, everything else as sent. `Err` for a path
/// whose meaning an upstream could read differently (see the module doc).
pub fn normalize(path: &str) -> Result<String, PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let mut normal = String::with_capacity(path.len());
    for segment in rest.split('/') {
        normal.push('/');
        let start = normal.len();
        push_segment(&mut normal, segment)?;
        match &normal[start..] {
            "" => return Err(PathError::EmptySegment),
            "." | ".." => return Err(PathError::DotSegment),
            _ => {}
        }
    }
    Ok(normal)
}

/// Appends one segment in normal form.
fn push_segment(normal: &mut String, segment: &str) -> Result<(), PathError> {
    let mut bytes = segment.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'%' => {
                let (Some(high), Some(low)) = (bytes.next(), bytes.next()) else {
                    return Err(PathError::BadEscape);
                };
                let (Some(high_value), Some(low_value)) = (hex_value(high), hex_value(low)) else {
                    return Err(PathError::BadEscape);
                };
                let decoded = high_value << 4 | low_value;
                match decoded {
                    b'/' | b'\\' => return Err(PathError::Slash),
                    b';' => return Err(PathError::Parameter),
                    b'%' => return Err(PathError::EncodedPercent),
                    0..0x20 | 0x7f => return Err(PathError::Unprintable),
                    _ if is_unreserved(decoded) => normal.push(char::from(decoded)),
                    _ => {
                        normal.push('%');
                        normal.push(char::from(high.to_ascii_uppercase()));
                        normal.push(char::from(low.to_ascii_uppercase()));
                    }
                }
            }
            b'\\' => return Err(PathError::Slash),
            b';' => return Err(PathError::Parameter),
            // `http::Uri` admits only visible ASCII in a path; anything else is refused
            // rather than passed on in a spelling nobody checked.
            0..0x21 | 0x7f.. => return Err(PathError::Unprintable),
            _ => normal.push(char::from(byte)),
        }
    }
    Ok(())
}

/// RFC 3986 §2.3: the characters whose escapes every server decodes alike.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).and_then(|value| u8::try_from(value).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_stay_as_they_are() {
        for path in
            ["/v1", "/v1/chat/completions", "/v1/files/file-abc123/content", "/v1/models/ft:gpt-4o:org:x"]
        {
            assert_eq!(normalize(path).as_deref(), Ok(path));
        }
    }

    #[test]
    fn escapes_of_unreserved_characters_are_decoded() {
        assert_eq!(normalize("/v1/%63hat/completions").as_deref(), Ok("/v1/chat/completions"));
        assert_eq!(normalize("/v1/chat/%43OMPLETIONS").as_deref(), Ok("/v1/chat/COMPLETIONS"));
        assert_eq!(normalize("/%76%31/models/a%2Db%5F%7E").as_deref(), Ok("/v1/models/a-b_~"));
    }

    #[test]
    fn other_escapes_are_kept_in_upper_case() {
        assert_eq!(normalize("/v1/files/a%3ab%20c").as_deref(), Ok("/v1/files/a%3Ab%20c"));
        assert_eq!(normalize("/v1/models/caf%c3%a9").as_deref(), Ok("/v1/models/caf%C3%A9"));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let cases = [
            ("*", PathError::NotAbsolute),
            ("v1/models", PathError::NotAbsolute),
            ("/v1//models", PathError::EmptySegment),
            ("/v1/models/", PathError::EmptySegment),
            ("/v1/../admin", PathError::DotSegment),
            ("/v1/./models", PathError::DotSegment),
            ("/v1/%2e%2E/admin", PathError::DotSegment),
            ("/v1/.%2e/admin", PathError::DotSegment),
            ("/v1/%2E/models", PathError::DotSegment),
            ("/v1/chat%2Fcompletions", PathError::Slash),
            ("/v1/..%2f..%2fadmin", PathError::Slash),
            ("/v1/chat%5ccompletions", PathError::Slash),
            ("/v1/chat\\completions", PathError::Slash),
            ("/v1/chat/completions;x=1", PathError::Parameter),
            ("/v1/chat/completions%3B", PathError::Parameter),
            ("/v1/%252e%252e/admin", PathError::EncodedPercent),
            ("/v1/models%00", PathError::Unprintable),
            ("/v1/models%7f", PathError::Unprintable),
            ("/v1/models%", PathError::BadEscape),
            ("/v1/models%4", PathError::BadEscape),
            ("/v1/models%zz", PathError::BadEscape),
        ];
        for (path, error) in cases {
            assert_eq!(normalize(path), Err(error), "{path}");
        }
    }

    #[test]
    fn dots_inside_a_name_are_fine() {
        assert_eq!(normalize("/v1/models/gpt-4.1").as_deref(), Ok("/v1/models/gpt-4.1"));
        assert_eq!(normalize("/v1/files/...").as_deref(), Ok("/v1/files/..."));
        assert_eq!(normalize("/v1/files/..x").as_deref(), Ok("/v1/files/..x"));
    }

    proptest::proptest! {
        /// The normal form is a fixed point: normalising it again changes nothing, so
        /// an upstream that normalises the same way reads exactly what was decided.
        #[test]
        fn normal_form_is_stable(path in "/[a-zA-Z0-9%./;\\\\:~_-]{0,40}") {
            if let Ok(normal) = normalize(&path) {
                proptest::prop_assert_eq!(normalize(&normal), Ok(normal.clone()));
            }
        }
    }
}
