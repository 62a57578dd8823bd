//! Which functions of the shared Lua library a script carries: only those
//! it calls (each `local function` of the text is a closure made on every
//! call, called or not).

/// The functions of `lib` that `body` calls, directly or through one
/// another, in the library's order (each with the comment above it).
///
/// Every `EVALSHA` runs the whole script text, so each `local function` of
/// the library is a closure created (and later collected) on every call: a
/// lease paid for all eighteen of them while calling five. The library is a
/// sequence of top-level `local function NAME(` chunks; a chunk is kept
/// when its name is used, as a whole word, by the body or a kept chunk.
pub(crate) fn used_lib(lib: &str, body: &str) -> String {
    // (name, text) per top-level function, comments going with the next one
    let mut chunks: Vec<(String, String)> = Vec::new();
    let mut pending = String::new();
    let mut open = false;
    for line in lib.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("local function ") {
            let name = rest.split('(').next().unwrap_or("").trim().to_owned();
            chunks.push((name, std::mem::take(&mut pending)));
            open = true;
        }
        match chunks.last_mut() {
            Some((_, text)) if open => text.push_str(line),
            _ => pending.push_str(line),
        }
        // a function ends at the `end` in its first column
        if line.trim_end() == "end" {
            open = false;
        }
    }
    debug_assert!(!open, "a library function has no `end` in its first column");
    let uses = |text: &str, name: &str| {
        text.match_indices(name).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + name.len()..].chars().next();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            !word(before) && !word(after)
        })
    };
    let mut keep = vec![false; chunks.len()];
    // later chunks may only call earlier ones: one pass from the end
    let mut needed = body.to_owned();
    for i in (0..chunks.len()).rev() {
        if uses(&needed, &chunks[i].0) {
            keep[i] = true;
            needed.push_str(&chunks[i].1);
        }
    }
    chunks
        .into_iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|((_, text), _)| text)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A script carries the library functions it calls and those they
    /// call, in the library's order with their comments, and no others.
    #[test]
    fn scripts_carry_only_the_library_functions_they_use() {
        let lib = "-- header\n\n-- a's doc\nlocal function a(x)\n  return x\nend\n\n\
                   -- b's doc\nlocal function b(x)\n  return a(x) + 1\nend\n\n\
                   local function ab_c()\n  return 3\nend\n\
                   -- d\nlocal function d()\n  if true then\n    return 4\n  end\nend\n";
        let both = used_lib(lib, "return b(2)");
        assert_eq!(
            both,
            "-- header\n\n-- a's doc\nlocal function a(x)\n  return x\nend\n\n\
             -- b's doc\nlocal function b(x)\n  return a(x) + 1\nend\n"
        );
        // whole words only: `ab_c` does not pull in `a` or `b`
        assert_eq!(
            used_lib(lib, "return ab_c()"),
            "\nlocal function ab_c()\n  return 3\nend\n"
        );
        assert!(used_lib(lib, "return d()").ends_with("    return 4\n  end\nend\n"));
        assert_eq!(used_lib(lib, "return 1"), "");
    }
}
