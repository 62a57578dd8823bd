//! Redis-compatible glob patterns.
//!
//! The embedded store emulates `SCAN MATCH` with [`matches`], so its answers have to agree with
//! Redis's `stringmatchlen` byte for byte, including the odd corners of its character-class
//! parser. Patterns are also checked with [`validate`] before they reach a real Redis, because
//! Redis silently accepts malformed patterns and gives surprising results for them.
//!
//! Known, deliberate differences from Redis 7:
//! - Redis never matches the empty key against a non-empty pattern (its matching loop stops
//!   as soon as the text is exhausted; `KEYS *` only works because `*` alone is special-cased).
//!   Here a pattern made only of `*` matches the empty text, as glob semantics say it should.
//! - Redis compares class range bounds as C `char`, which is signed on x86 and unsigned on Arm,
//!   so ranges with bytes >= 0x80 depend on the server's CPU. Bytes are unsigned here.
//! - Redis gives up (no match) after 1000 levels of `*` recursion; this matcher has no
//!   recursion and therefore no such limit.

use thiserror::Error;

/// Why a pattern was rejected by [`validate`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PatternError {
    #[error("unterminated character class starting at byte {0}")]
    UnterminatedClass(usize),
    #[error("pattern ends with an unescaped backslash")]
    TrailingEscape,
}

/// Checks that a pattern is well formed (balanced `[...]`, no trailing `\`).
///
/// Classes are delimited exactly the way Redis reads them, so some patterns that look balanced
/// are not: in `[a-]` the `]` is taken as the end of the range `a-]`, leaving the class open.
pub fn validate(pattern: &str) -> Result<(), PatternError> {
    let p = pattern.as_bytes();
    let mut i = 0;
    while let Some(&b) = p.get(i) {
        i = match b {
            b'\\' if i + 1 < p.len() => i + 2,
            b'\\' => return Err(PatternError::TrailingEscape),
            b'[' => {
                let class = scan_class(p, i, None);
                if !class.terminated {
                    return Err(PatternError::UnterminatedClass(i));
                }
                class.next
            }
            _ => i + 1,
        };
    }
    Ok(())
}

/// Whether `text` matches `pattern` with Redis's `stringmatchlen` semantics (case-sensitive).
///
/// `*` matches any run of bytes, `?` exactly one byte, `[abc]`, `[a-z]`, `[^abc]` a byte from
/// (or not from) a class, and `\x` the byte `x` literally, also inside classes. Backwards ranges
/// such as `[z-a]` mean `[a-z]`. Malformed patterns are read the way Redis reads them: an
/// unterminated class runs to the end of the pattern and a trailing `\` is a literal backslash.
///
/// Every token other than `*` consumes exactly one byte, so remembering only the most recent
/// `*` is enough: letting an earlier `*` absorb more text can never help once a later `*` has
/// been reached. That keeps the worst case at O(len(pattern) * len(text)), where a naive
/// recursive matcher goes exponential on patterns like `*a*a*a*a*b`.
pub fn matches(pattern: &[u8], text: &[u8]) -> bool {
    let mut p = 0;
    let mut t = 0;
    // Pattern position just after the latest `*`, and the text position that `*` would
    // stop absorbing at if the rest of the pattern fails from there.
    let mut backtrack: Option<(usize, usize)> = None;
    while let Some(&c) = text.get(t) {
        match step(pattern, p, c) {
            Step::Star(next) => {
                backtrack = Some((next, t));
                p = next;
            }
            Step::Consumed(next) => {
                p = next;
                t += 1;
            }
            Step::Mismatch => match backtrack {
                Some((after_star, absorbed_until)) => {
                    backtrack = Some((after_star, absorbed_until + 1));
                    p = after_star;
                    t = absorbed_until + 1;
                }
                None => return false,
            },
        }
    }
    while pattern.get(p) == Some(&b'*') {
        p += 1;
    }
    p == pattern.len()
}

/// Escapes `*`, `?`, `[`, `]` and `\` so the literal can be used inside a pattern.
pub fn escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The literal (unescaped) text every match must start with: the pattern's leading run of
/// bytes before the first unescaped `*`, `?` or `[`, with escapes resolved.
///
/// For example `user:\*x*` gives `user:*x`. A trailing `\` counts as a literal backslash, as
/// it does in [`matches`], so the result stays a true prefix even for unvalidated patterns.
pub fn literal_prefix(pattern: &str) -> String {
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' | '?' | '[' => break,
            // Redis escapes a single byte, but every byte of a multi-byte character is
            // non-special, so escaping the whole character yields the same literal.
            '\\' => out.push(chars.next().unwrap_or('\\')),
            _ => out.push(c),
        }
    }
    out
}

/// What one pattern token does with one text byte.
enum Step {
    /// A `*` ends at the given pattern index; it consumes no text by itself.
    Star(usize),
    /// The token matched the byte; the next token starts at the given index.
    Consumed(usize),
    Mismatch,
}

fn step(pattern: &[u8], p: usize, c: u8) -> Step {
    let Some(&b) = pattern.get(p) else {
        return Step::Mismatch;
    };
    let (matched, next) = match b {
        b'*' => return Step::Star(p + 1),
        b'?' => (true, p + 1),
        b'[' => {
            let class = scan_class(pattern, p, Some(c));
            (class.matched, class.next)
        }
        b'\\' => match pattern.get(p + 1) {
            Some(&escaped) => (escaped == c, p + 2),
            None => (b == c, p + 1),
        },
        _ => (b == c, p + 1),
    };
    if matched {
        Step::Consumed(next)
    } else {
        Step::Mismatch
    }
}

struct Class {
    /// Index just past the class (past its `]`, or the pattern length if unterminated).
    next: usize,
    terminated: bool,
    /// Whether the byte belongs to the class, negation applied; false when no byte is given.
    matched: bool,
}

/// Reads the class opening at `pattern[open]` with Redis's exact precedence: an escape first,
/// then `]`, then a range `x-y` (whose end may be `]` or `\`, both taken literally), then a
/// literal byte. Finding the end and testing membership share one pass so validation and
/// matching cannot disagree about where a class stops.
fn scan_class(pattern: &[u8], open: usize, byte: Option<u8>) -> Class {
    let mut i = open + 1;
    let negated = pattern.get(i) == Some(&b'^');
    if negated {
        i += 1;
    }
    let is = |b: u8| byte == Some(b);
    let mut found = false;
    let terminated = loop {
        let Some(&b) = pattern.get(i) else {
            break false;
        };
        match b {
            b'\\' if i + 1 < pattern.len() => {
                found |= pattern.get(i + 1).copied().is_some_and(is);
                i += 2;
            }
            b']' => {
                i += 1;
                break true;
            }
            _ => {
                if pattern.get(i + 1) == Some(&b'-')
                    && let Some(&end) = pattern.get(i + 2)
                {
                    let (lo, hi) = if b <= end { (b, end) } else { (end, b) };
                    found |= byte.is_some_and(|c| (lo..=hi).contains(&c));
                    i += 3;
                } else {
                    found |= is(b);
                    i += 1;
                }
            }
        }
    };
    Class {
        next: i,
        terminated,
        matched: byte.is_some() && found != negated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// (pattern, text, whether Redis matches). Every row was checked against a real
    /// redis-server 7.0 with both `KEYS` and `SCAN MATCH`. Empty texts are left out on
    /// purpose; see `empty_text_and_empty_pattern` and the module docs.
    const REDIS_CASES: &[(&[u8], &[u8], bool)] = &[
        // Literals and the basic wildcards.
        (b"abc", b"abc", true),
        (b"abc", b"abcd", false),
        (b"abc", b"ab", false),
        (b"ABC", b"abc", false),
        (b"*", b"anything", true),
        (b"a*", b"a", true),
        (b"a*", b"abc", true),
        (b"a*", b"ba", false),
        (b"*c", b"abc", true),
        (b"*c", b"abcd", false),
        (b"a*c", b"ac", true),
        (b"a*c", b"abbbc", true),
        (b"a*c", b"abcb", false),
        (b"a**c", b"abc", true),
        (b"*a*", b"bab", true),
        (b"*a*", b"bbb", false),
        (b"?", b"a", true),
        (b"?", b"ab", false),
        (b"??", b"ab", true),
        (b"a?c", b"abc", true),
        (b"a?c", b"ac", false),
        (b"*?", b"a", true),
        (b"?*?", b"a", false),
        (b"?*?", b"ab", true),
        (b"user:*:name", b"user:42:name", true),
        (b"user:*:name", b"user:42:names", false),
        (b"*a*b", b"aaaaaaab", true),
        (b"*a*b", b"aaaaaaa", false),
        (b"*ab*cd", b"abxabcd", true),
        (b"*aab", b"aaab", true),
        // Classes.
        (b"[abc]", b"b", true),
        (b"[abc]", b"d", false),
        (b"[abc]", b"ab", false),
        (b"[a-c]x", b"bx", true),
        (b"[a-c]", b"d", false),
        (b"[c-a]", b"b", true),
        (b"[z-a]", b"m", true),
        (b"[^abc]", b"d", true),
        (b"[^abc]", b"a", false),
        (b"[^a-c]", b"b", false),
        (b"[^a-c]", b"z", true),
        (b"[a-cx-z]", b"y", true),
        (b"[a-cx-z]", b"m", false),
        (b"[-a]", b"-", true),
        (b"[a-]x]", b"_", true),
        (b"[a-]x]", b"-", false),
        (b"[a-]x]", b"x", true),
        (b"[]", b"a", false),
        (b"[]a]", b"a", false),
        (b"[]a]", b"a]", false),
        (b"[^]", b"a", true),
        (b"[^]", b"]", true),
        (b"[^]]", b"a", false),
        (b"[^]]", b"a]", true),
        (b"[\\]]", b"]", true),
        (b"[\\]]", b"\\", false),
        (b"[\\^a]", b"^", true),
        (b"[\\a-c]", b"b", false),
        (b"[\\a-c]", b"-", true),
        (b"[a-\\]]", b"\\]", true),
        (b"[a-\\]]", b"a]", true),
        (b"[a-\\]]", b"b]", false),
        (b"[a-\\]]", b"\\", false),
        (b"[*]", b"*", true),
        (b"[*]", b"a", false),
        (b"[?]", b"?", true),
        (b"[[]", b"[", true),
        (b"x[ab]y[^c]z", b"xbydz", true),
        // Escapes outside classes.
        (b"\\*", b"*", true),
        (b"\\*", b"a", false),
        (b"\\?", b"?", true),
        (b"\\?", b"a", false),
        (b"\\[a]", b"[a]", true),
        (b"\\a", b"a", true),
        (b"\\\\", b"\\", true),
        (b"a\\*b*", b"a*bc", true),
        (b"a\\*b*", b"axbc", false),
        // Malformed patterns as Redis reads them.
        (b"[abc", b"b", true),
        (b"[abc", b"[", false),
        (b"[a-", b"a", true),
        (b"[a-", b"-", true),
        (b"[a-]", b"_", true),
        (b"[a-]", b"-", false),
        (b"[", b"[", false),
        (b"[^", b"x", true),
        (b"[^", b"xy", false),
        (b"a\\", b"a\\", true),
        (b"a\\", b"a", false),
        (b"[a\\", b"\\", true),
        (b"]", b"]", true),
        // Bytes that are not UTF-8.
        (b"*", b"\xff\xfe", true),
        (b"?", b"\xff", true),
        (b"??", b"\xc3\xa9", true),
        (b"a*\xff", b"ab\xff", true),
        (b"[\xfe-\xff]", b"\xfe", true),
        (b"[^\xff]", b"\xff", false),
        (b"[^\xff]", b"\xfe", true),
        (b"\\\xff", b"\xff", true),
    ];

    #[test]
    fn agrees_with_redis() {
        for &(pattern, text, expected) in REDIS_CASES {
            assert_eq!(
                matches(pattern, text),
                expected,
                "pattern {:?} text {:?}",
                String::from_utf8_lossy(pattern),
                String::from_utf8_lossy(text),
            );
        }
    }

    #[test]
    fn empty_text_and_empty_pattern() {
        assert!(matches(b"", b""));
        assert!(!matches(b"", b"a"));
        assert!(!matches(b"", b"\0"));
        assert!(matches(b"*", b""));
        assert!(matches(b"***", b""));
        assert!(!matches(b"?", b""));
        assert!(!matches(b"[^a]", b""));
        assert!(!matches(b"*?*", b""));
        assert!(!matches(b"\\*", b""));
    }

    #[test]
    fn escape_round_trips() {
        let nasty = [
            "",
            "plain",
            "a*b?[c]\\d",
            "\\",
            "\\\\",
            "*",
            "[",
            "]",
            "[^a-z]",
            "-^!",
            "ends with \\",
            "ünï*cødé?",
            "koo:v1:",
        ];
        for literal in nasty {
            let pattern = escape(literal);
            assert_eq!(validate(&pattern), Ok(()), "{pattern:?}");
            assert!(
                matches(pattern.as_bytes(), literal.as_bytes()),
                "{pattern:?}"
            );
            assert_eq!(literal_prefix(&pattern), literal);
            for other in nasty.iter().filter(|&&o| o != literal) {
                assert!(
                    !matches(pattern.as_bytes(), other.as_bytes()),
                    "{pattern:?} vs {other:?}"
                );
            }
            // The way koo uses it: an escaped prefix followed by a user pattern.
            let scoped = format!("{pattern}*");
            assert!(matches(
                scoped.as_bytes(),
                format!("{literal}key").as_bytes()
            ));
        }
        assert_eq!(escape("a*b?[c]\\d"), "a\\*b\\?\\[c\\]\\\\d");
    }

    #[test]
    fn literal_prefix_cases() {
        let cases = [
            ("", ""),
            ("*", ""),
            ("abc", "abc"),
            ("user:*", "user:"),
            ("user:\\*x*", "user:*x"),
            ("a?b", "a"),
            ("a[bc]d", "a"),
            ("a]b*", "a]b"),
            ("a\\[b\\]*", "a[b]"),
            ("a\\\\*", "a\\"),
            ("a\\", "a\\"),
            ("\\é*", "é"),
            ("-^*", "-^"),
        ];
        for (pattern, prefix) in cases {
            assert_eq!(literal_prefix(pattern), prefix, "{pattern:?}");
        }
    }

    #[test]
    fn literal_prefix_is_a_prefix_of_every_match() {
        let texts: &[&[u8]] = &[b"user:*x", b"user:*xyz", b"a]b", b"a[b]c", b"abc"];
        let patterns = ["user:\\*x*", "a]b*", "a\\[b\\]*", "a?c", "[a]bc", "abc"];
        for pattern in patterns {
            let prefix = literal_prefix(pattern);
            for &text in texts {
                if matches(pattern.as_bytes(), text) {
                    assert!(text.starts_with(prefix.as_bytes()), "{pattern:?} {text:?}");
                }
            }
        }
    }

    #[test]
    fn validate_accepts_well_formed() {
        for pattern in [
            "",
            "abc",
            "*",
            "a*b?c",
            "[abc]",
            "[^a-z]",
            "[]",
            "[^]",
            "[\\]]",
            "[a-\\]]",
            "[a-]x]",
            "\\[",
            "]",
            "\\\\",
            "x[ab]y[^c]z\\*",
        ] {
            assert_eq!(validate(pattern), Ok(()), "{pattern:?}");
        }
    }

    #[test]
    fn validate_rejects_malformed() {
        let cases = [
            ("[", PatternError::UnterminatedClass(0)),
            ("[abc", PatternError::UnterminatedClass(0)),
            ("ab[c", PatternError::UnterminatedClass(2)),
            ("[a][b", PatternError::UnterminatedClass(3)),
            ("[^", PatternError::UnterminatedClass(0)),
            ("[\\]", PatternError::UnterminatedClass(0)),
            ("x[a\\", PatternError::UnterminatedClass(1)),
            // Redis reads `a-]` as a range, so this class never closes.
            ("[a-]", PatternError::UnterminatedClass(0)),
            ("\\", PatternError::TrailingEscape),
            ("abc\\", PatternError::TrailingEscape),
            ("a\\\\\\", PatternError::TrailingEscape),
            ("[a]\\", PatternError::TrailingEscape),
        ];
        for (pattern, error) in cases {
            assert_eq!(validate(pattern), Err(error), "{pattern:?}");
        }
        assert_eq!(
            PatternError::UnterminatedClass(3).to_string(),
            "unterminated character class starting at byte 3"
        );
    }

    #[test]
    fn pathological_pattern_is_fast() {
        let started = Instant::now();
        let pattern = "*a".repeat(50) + "*b";
        let text = vec![b'a'; 20_000];
        assert!(!matches(pattern.as_bytes(), &text));
        let pattern = "*a*a*a*a*a*a*a*a*a*a*b";
        assert!(!matches(pattern.as_bytes(), &text));
        let mut hit = text.clone();
        hit.push(b'b');
        assert!(matches(pattern.as_bytes(), &hit));
        let classes = "*[a-z]".repeat(100) + "*[0-9]";
        assert!(!matches(classes.as_bytes(), &text));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        // Every short pattern over the bytes that mean something to the parser, against a
        // few texts: exercises all the end-of-pattern paths.
        let alphabet = b"*?[]^-\\a";
        let texts: &[&[u8]] = &[b"", b"a", b"-", b"]", b"\\", b"a]", b"\xff"];
        let mut pattern = Vec::new();
        for n in 0..=4u32 {
            for mut code in 0..alphabet.len().pow(n) {
                pattern.clear();
                for _ in 0..n {
                    pattern.push(alphabet[code % alphabet.len()]);
                    code /= alphabet.len();
                }
                for text in texts {
                    let _ = matches(&pattern, text);
                }
                if let Ok(s) = std::str::from_utf8(&pattern) {
                    let _ = validate(s);
                    let _ = literal_prefix(s);
                }
            }
        }
    }
}
