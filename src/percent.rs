//! `%XX` escapes, decoded strictly: a malformed escape (`%`, `%zz`) or
//! bytes that are not UTF-8 once decoded are refused, never passed through
//! or replaced by U+FFFD. A lenient decoder turns two different inputs
//! into one string (`%C0` and `%FF` both become U+FFFD), so that a request
//! could name a key it never meant, or a credential differ from the one
//! configured. One decoder for every place koo reads escapes: URL
//! credentials, OTLP headers, REST query parameters.

/// `s` with its `%XX` escapes decoded; `None` for a malformed escape or a
/// result that is not UTF-8 (the caller names the input in its message).
pub fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::decode;

    /// Escapes decode; a malformed escape or a result that is not UTF-8 is
    /// refused, never passed through or replaced.
    #[test]
    fn strict() {
        assert_eq!(decode("a%2Fb%40c").as_deref(), Some("a/b@c"));
        assert_eq!(decode("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(decode("plain").as_deref(), Some("plain"));
        for bad in ["%", "%2", "%zz", "%C0", "%FF%FE", "a%é"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
