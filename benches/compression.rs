//! What compression buys the cache: bytes saved and CPU spent per zlib
//! level, on a realistic mix of values, through koo's own encoder
//! (`koo::cache::value::encode`/`decode`, the code every `Set` and `Get`
//! runs; no server, no network: this measures the codec, not the path).
//!
//! The seed promised "compression cuts memory by 30-50 % for large values";
//! this is the measurement. The mix, by count (sizes drawn per value, from a
//! fixed seed so that every run encodes the same bytes):
//!
//! - **JSON documents** (40 %): API-style records (ids, names, e-mails, ISO
//!   times, nested addresses, tags, numbers), 0.5 to 64 KiB;
//! - **text** (30 %): slices of this repository's own Markdown (README,
//!   docs/), 1 to 16 KiB: prose with code and tables;
//! - **already compressed** (20 %): gzip of such text and pseudo-random
//!   bytes (images, archives, encrypted blobs), 1 to 64 KiB;
//! - **small values** (10 %): 50 to 1,000 B JSON, under the default
//!   threshold (1,024 B), which are never compressed.
//!
//! For level 0 (compression off) and 1 (koo's default), 6 and 9, it prints
//! the payload bytes stored against the bytes set, per kind and in total,
//! and the CPU cost of `encode` and `decode` (ns per KiB set, median of
//! `BENCH_REPS` passes, default 5). One JSON line per (level, kind) goes to
//! stdout and `target/bench-results/compression.jsonl`.
//!
//! Run: `cargo bench --bench compression` (`BENCH_VALUES`, default 2,000).

use std::io::Write as _;
use std::time::Instant;

use bytes::Bytes;
use flate2::Compression;
use koo::cache::value::{self, Value};

/// The default threshold (CACHE_COMPRESSION_THRESHOLD).
const THRESHOLD: usize = 1024;

/// A small, fixed-seed generator: the same corpus on every run and machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A size between `lo` and `hi`, log-uniform (many small, some large).
    fn size(&mut self, lo: usize, hi: usize) -> usize {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        let u = self.below(1_000_000) as f64 / 1_000_000.0;
        (a + (b - a) * u).exp() as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const FIRST: &[&str] = &[
    "Ada", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances", "Alan", "Edsger",
    "Radia", "Leslie", "Tim", "Sophie", "Guido", "Yukihiro",
];
const LAST: &[&str] = &[
    "Lovelace",
    "Hopper",
    "Torvalds",
    "Hamilton",
    "Thompson",
    "Liskov",
    "Ritchie",
    "Allen",
    "Turing",
    "Dijkstra",
    "Perlman",
    "Lamport",
    "Berners-Lee",
    "Wilson",
    "van Rossum",
    "Matsumoto",
];
const CITIES: &[&str] = &[
    "Lisbon",
    "Nairobi",
    "Osaka",
    "Montreal",
    "Berlin",
    "Santiago",
    "Auckland",
    "Reykjavik",
];
const TAGS: &[&str] = &[
    "premium",
    "trial",
    "beta",
    "admin",
    "eu",
    "us",
    "apac",
    "churn-risk",
    "enterprise",
    "edu",
];
const STATUS: &[&str] = &["active", "suspended", "pending", "closed"];

/// One API-style record.
fn record(rng: &mut Rng, id: u64) -> String {
    let (first, last) = (rng.pick(FIRST), rng.pick(LAST));
    let tags: Vec<String> = (0..rng.below(4))
        .map(|_| format!("\"{}\"", rng.pick(TAGS)))
        .collect();
    format!(
        concat!(
            r#"{{"id":{},"uuid":"{:016x}{:016x}","name":"{} {}","email":"{}.{}@example.com","#,
            r#""status":"{}","created_at":"2026-{:02}-{:02}T{:02}:{:02}:{:02}Z","balance":{}.{:02},"#,
            r#""address":{{"street":"{} Main St","city":"{}","zip":"{:05}"}},"tags":[{}],"#,
            r#""verified":{},"logins":{}}}"#
        ),
        id,
        rng.next(),
        rng.next(),
        first,
        last,
        first.to_lowercase(),
        last.to_lowercase().replace(' ', ""),
        rng.pick(STATUS),
        1 + rng.below(12),
        1 + rng.below(28),
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.below(100_000),
        rng.below(100),
        1 + rng.below(9_999),
        rng.pick(CITIES),
        rng.below(100_000),
        tags.join(","),
        rng.below(2) == 1,
        rng.below(5_000),
    )
}

/// A JSON document of about `size` bytes: a page of records.
fn json_document(rng: &mut Rng, size: usize) -> String {
    let mut out = String::from(r#"{"page":1,"per_page":50,"items":["#);
    let mut id = rng.below(1_000_000);
    while out.len() < size {
        if !out.ends_with('[') {
            out.push(',');
        }
        out.push_str(&record(rng, id));
        id += 1;
    }
    out.push_str("]}");
    out
}

/// The repository's own Markdown: real prose, code and tables.
fn text_corpus() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut text = std::fs::read_to_string(format!("{root}/README.md")).unwrap_or_default();
    if let Ok(dir) = std::fs::read_dir(format!("{root}/docs/design")) {
        let mut paths: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            text.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
    }
    assert!(
        text.len() > 64 * 1024,
        "the text corpus (README.md, docs/design) is missing"
    );
    text
}

/// A slice of `corpus` of about `size` bytes, on char boundaries.
fn text_slice(rng: &mut Rng, corpus: &str, size: usize) -> String {
    let mut start = rng.below((corpus.len() - size) as u64) as usize;
    while !corpus.is_char_boundary(start) {
        start += 1;
    }
    let mut end = (start + size).min(corpus.len());
    while !corpus.is_char_boundary(end) {
        end -= 1;
    }
    corpus[start..end].to_owned()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), Compression::best());
    e.write_all(bytes).expect("gzip into memory");
    e.finish().expect("gzip into memory")
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Json,
    Text,
    Compressed,
    Small,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Json => "json documents",
            Kind::Text => "text",
            Kind::Compressed => "already compressed",
            Kind::Small => "small (< threshold)",
        }
    }
}

fn corpus(n: usize) -> Vec<(Kind, Value)> {
    let text = text_corpus();
    let mut rng = Rng(0x9e59_4c5c_77bb_92d1);
    (0..n)
        .map(|_| match rng.below(10) {
            0..=3 => {
                let size = rng.size(512, 64 * 1024);
                (Kind::Json, Value::Json(json_document(&mut rng, size)))
            }
            4..=6 => {
                let size = rng.size(1024, 16 * 1024);
                (Kind::Text, Value::Text(text_slice(&mut rng, &text, size)))
            }
            7 | 8 => {
                let size = rng.size(1024, 64 * 1024);
                let bytes = if rng.below(2) == 0 {
                    gzip(text_slice(&mut rng, &text, size * 3).as_bytes())
                } else {
                    (0..size).map(|_| rng.next() as u8).collect()
                };
                (Kind::Compressed, Value::Raw(Bytes::from(bytes)))
            }
            _ => {
                let size = rng.size(50, 1000);
                let mut doc = json_document(&mut rng, 0);
                doc.truncate(size.min(doc.len()));
                (Kind::Small, Value::Text(doc))
            }
        })
        .collect()
}

#[derive(Default, Clone, Copy)]
struct Tally {
    values: u64,
    set: u64,
    stored: u64,
    compressed: u64,
    encode_ns: f64,
    decode_ns: f64,
}

/// Encodes and decodes every value once at `level`; per kind tallies.
fn pass(values: &[(Kind, Value)], level: u32) -> Vec<(Kind, Tally)> {
    let mut tallies: std::collections::BTreeMap<Kind, Tally> = Default::default();
    for (kind, v) in values {
        let t = tallies.entry(*kind).or_default();
        let started = Instant::now();
        let encoded = value::encode(v, THRESHOLD, Compression::new(level));
        t.encode_ns += started.elapsed().as_nanos() as f64;
        let started = Instant::now();
        let decoded = value::decode(&encoded.bytes).expect("koo decodes what it encoded");
        t.decode_ns += started.elapsed().as_nanos() as f64;
        assert_eq!(&decoded.value, v, "a value must round-trip");
        t.values += 1;
        t.set += v.len() as u64;
        // payload only: koo's fixed header is not compression's doing
        t.stored += (encoded.bytes.len() - value::HEADER) as u64;
        t.compressed += u64::from(encoded.compressed);
    }
    tallies.into_iter().collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::var("BENCH_VALUES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let values = corpus(n);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&dir).expect("create target/bench-results");
    let mut out = std::fs::File::create(dir.join("compression.jsonl")).expect("results file");
    println!(
        "| level | kind | values | MiB set | MiB stored | saved | compressed | encode ns/KiB | decode ns/KiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for level in [0u32, 1, 6, 9] {
        // the byte counts are the same every pass; the times take the median
        let passes: Vec<Vec<(Kind, Tally)>> = (0..reps).map(|_| pass(&values, level)).collect();
        let mut rows: Vec<(String, Tally)> = Vec::new();
        let mut total = Tally::default();
        for (i, (kind, first)) in passes[0].iter().enumerate() {
            let mut t = *first;
            t.encode_ns = median(passes.iter().map(|p| p[i].1.encode_ns).collect());
            t.decode_ns = median(passes.iter().map(|p| p[i].1.decode_ns).collect());
            total.values += t.values;
            total.set += t.set;
            total.stored += t.stored;
            total.compressed += t.compressed;
            total.encode_ns += t.encode_ns;
            total.decode_ns += t.decode_ns;
            rows.push((kind.label().to_owned(), t));
        }
        rows.push(("all".to_owned(), total));
        for (kind, t) in rows {
            let kib = t.set as f64 / 1024.0;
            let saved = 100.0 * (1.0 - t.stored as f64 / t.set as f64);
            let row = serde_json::json!({
                "bench": "compression", "level": level, "kind": kind, "values": t.values,
                "bytes_set": t.set, "bytes_stored": t.stored, "saved_pct": saved,
                "compressed_values": t.compressed,
                "encode_ns_per_kib": t.encode_ns / kib, "decode_ns_per_kib": t.decode_ns / kib,
                "reps": reps,
            });
            writeln!(out, "{row}").expect("write results");
            println!(
                "| {level}{} | {kind} | {} | {:.2} | {:.2} | {saved:.1} % | {} | {:.0} | {:.0} |",
                if level == 1 { " (default)" } else { "" },
                t.values,
                t.set as f64 / 1048576.0,
                t.stored as f64 / 1048576.0,
                t.compressed,
                t.encode_ns / kib,
                t.decode_ns / kib,
            );
        }
    }
}
