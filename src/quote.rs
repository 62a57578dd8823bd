//! Quoting user input in messages, bounded.
//!
//! An error message travels in the `grpc-message` trailer, and clients refuse
//! trailers past their metadata limit (8 KiB to 16 KiB is common): a message
//! that quotes a 1 MiB queue name whole reaches the caller as
//! `RESOURCE_EXHAUSTED` ("received metadata size exceeds hard limit")
//! instead of the refusal it explains. Every message that quotes what a
//! client (or a file, or a variable) sent goes through [`quote`], so none can
//! grow with its input. Domain modules use it too, which is why it lives at
//! the crate root rather than in `grpc`.

use std::fmt;

/// Most characters of an input a message quotes.
pub const MAX_QUOTED_CHARS: usize = 64;

/// `input` quoted for a message: Rust string syntax (control characters
/// escaped, so a quoted NUL or newline cannot break a log line), at most
/// [`MAX_QUOTED_CHARS`] characters of it, and when it is longer an ellipsis
/// and its length: `"qqqq…" (1048576 bytes)`.
pub fn quote(input: &str) -> Quoted<'_> {
    Quoted(input)
}

/// `input` quoted as [`quote`] does, always with its length in bytes
/// (once): for messages about an input's size.
pub fn quote_sized(input: &str) -> String {
    let mut out = String::new();
    let _ = write_quoted(&mut out, input, input.len(), true);
    out
}

/// Bytes from the input (a request body, say) quoted as [`quote`] does,
/// read as UTF-8 where they are (U+FFFD elsewhere), always with the
/// length of the whole input in bytes. Only the quoted head is decoded, so
/// a body of megabytes costs no more than a short one.
pub fn quote_bytes(input: &[u8]) -> String {
    // a character is at most four bytes: this head holds every quoted one
    let head = String::from_utf8_lossy(&input[..input.len().min(MAX_QUOTED_CHARS * 4 + 4)]);
    let mut out = String::new();
    let _ = write_quoted(&mut out, &head, input.len(), true);
    out
}

/// Writes `text` quoted, cut to [`MAX_QUOTED_CHARS`] characters with an
/// ellipsis, then ` (len bytes)` when it was cut or `always`: `len` is the
/// whole input's length (`text` may be only its head).
fn write_quoted(out: &mut impl fmt::Write, text: &str, len: usize, always: bool) -> fmt::Result {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => {
            let head = format!("{:?}", &text[..cut]);
            // the head's closing quote goes after the ellipsis
            write!(out, "{}…\" ({len} bytes)", &head[..head.len() - 1])
        }
        None if always => write!(out, "{text:?} ({len} bytes)"),
        None => write!(out, "{text:?}"),
    }
}

/// A bounded quotation of an input; see [`quote`].
#[derive(Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_quoted(f, self.0, self.0.len(), false)
    }
}

impl fmt::Debug for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A JSON value from the input, shown as JSON text (it is already quoted
/// where it is a string), bounded like [`quote`]: at most
/// [`MAX_QUOTED_CHARS`] characters, then an ellipsis and the text's length.
pub fn json(value: &serde_json::Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        None => text,
        Some((cut, _)) => format!("{}… ({} bytes)", &text[..cut], text.len()),
    }
}

/// `text` (a message, not an input) cut to at most `max` bytes on a
/// character boundary, with an ellipsis when cut: the last bound on any
/// status message, whatever built it.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Short inputs are quoted whole; long ones keep a prefix and say their
    /// length; control characters are escaped.
    #[test]
    fn bounded_and_escaped() {
        assert_eq!(quote("abc").to_string(), "\"abc\"");
        assert_eq!(quote("a\0b\n").to_string(), "\"a\\0b\\n\"");
        let huge = "q".repeat(1 << 20);
        let q = quote(&huge).to_string();
        assert!(q.len() < 100, "{q}");
        assert!(q.ends_with("…\" (1048576 bytes)"), "{q}");
        let exact = "é".repeat(MAX_QUOTED_CHARS);
        assert_eq!(quote(&exact).to_string(), format!("{exact:?}"));
        let over = "é".repeat(MAX_QUOTED_CHARS + 1);
        assert!(quote(&over).to_string().contains("(130 bytes)"));
    }

    /// Bytes are quoted by their head, with the whole input's length
    /// (a body of megabytes said to be its size, not the head's).
    #[test]
    fn bytes_quoted_with_their_length() {
        assert_eq!(quote_bytes(b"ab"), "\"ab\" (2 bytes)");
        let body = vec![b'z'; 300_049];
        let q = quote_bytes(&body);
        assert!(q.ends_with("…\" (300049 bytes)"), "{q}");
        assert!(q.len() < 100, "{q}");
        assert_eq!(
            quote_bytes(b"\xff!"),
            format!("{:?} (2 bytes)", "\u{fffd}!")
        );
    }

    /// JSON values are shown as JSON, bounded.
    #[test]
    fn json_values() {
        assert_eq!(json(&serde_json::json!(-1)), "-1");
        let long = json(&serde_json::json!(vec!["x"; 100000]));
        assert!(
            long.len() < 100 && long.ends_with("(400001 bytes)"),
            "{long}"
        );
    }

    /// Clipping keeps whole characters and marks the cut.
    #[test]
    fn clip_on_char_boundary() {
        assert_eq!(clip("short", 10), "short");
        let long = "é".repeat(100);
        let c = clip(&long, 11);
        assert!(c.len() <= 11 && c.ends_with('…'), "{c}");
    }
}
