//! CacheService end to end: every RPC, on the embedded store and on a real
//! Redis, through a real gRPC channel.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::Env;
use koo::pb::cache::v1::{self as pb, CacheLevel, cache_value::Kind};
use prost_types::value::Kind as JsonKind;
use tonic::Code;
use tonic_types::StatusExt;

fn text(s: &str) -> Option<pb::CacheValue> {
    Some(pb::CacheValue {
        kind: Some(Kind::Text(s.into())),
    })
}

fn raw(b: &[u8]) -> Option<pb::CacheValue> {
    Some(pb::CacheValue {
        kind: Some(Kind::Raw(b.to_vec().into())),
    })
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

fn millis(ms: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: 0,
        nanos: ms * 1_000_000,
    })
}

fn set_req(
    level: CacheLevel,
    key: &str,
    value: Option<pb::CacheValue>,
    ttl: Option<prost_types::Duration>,
) -> pb::SetRequest {
    pb::SetRequest {
        level: level as i32,
        key: key.into(),
        value,
        ttl,
        ..Default::default()
    }
}

fn get_req(level: CacheLevel, key: &str) -> pb::GetRequest {
    pb::GetRequest {
        level: level as i32,
        key: key.into(),
    }
}

fn entry(level: CacheLevel, key: &str, value: Option<pb::CacheValue>) -> pb::CacheEntry {
    pb::CacheEntry {
        level: level as i32,
        key: key.into(),
        value,
        ttl: None,
        ..Default::default()
    }
}

/// The field named by the status's BadRequest detail.
fn bad_field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_else(|| panic!("no BadRequest detail in {status:?}"))
}

fn bytes_of(r: &pb::GetResponse) -> Vec<u8> {
    match r.value.as_ref().and_then(|v| v.kind.clone()) {
        Some(Kind::Raw(b)) => b.to_vec(),
        Some(Kind::Text(t)) => t.into_bytes(),
        other => panic!("unexpected value {other:?}"),
    }
}

on_both_stores!(
    a_miss_is_not_an_error,
    default_ttls_follow_the_level,
    entries_expire_after_their_ttl,
    compression_threshold_boundaries_are_byte_exact,
    size_limit_boundaries,
    bad_input_is_refused_naming_the_field,
    malformed_protobuf_is_invalid_argument_and_server_keeps_serving,
    watch_metrics_streams_successive_snapshots,
    // upkeep tasks: on a Cluster once the task engine runs there
    warm_loads_request_and_file_entries,
    maintenance_reports_largest_keys,
);

// What a Cluster changes: keys across slots (batches, SetMany, GetMany),
// walks of every master (listing, clearing, counting, maintenance), figures
// summed over masters (metrics, health), the warm-up's writes.
on_all_stores!(
    values_round_trip_in_the_form_they_were_set,
    levels_are_separate_namespaces,
    batch_operations,
    set_many_is_all_or_nothing,
    list_keys_pages_through_everything,
    list_keys_patterns_stay_in_the_level,
    clear_level_removes_only_that_level,
    metrics_count_per_level,
    health_reports_the_backend,
);

/// Raw bytes (every byte value), text and nested JSON come back exactly as
/// set, with TTL and sizes.
async fn values_round_trip_in_the_form_they_were_set(env: Env) {
    let mut c = env.cache();
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let json = prost_types::Value {
        kind: Some(JsonKind::StructValue(prost_types::Struct {
            fields: [
                (
                    "n".to_string(),
                    prost_types::Value {
                        kind: Some(JsonKind::NumberValue(1.5)),
                    },
                ),
                (
                    "l".to_string(),
                    prost_types::Value {
                        kind: Some(JsonKind::ListValue(prost_types::ListValue {
                            values: vec![
                                prost_types::Value {
                                    kind: Some(JsonKind::BoolValue(true)),
                                },
                                prost_types::Value {
                                    kind: Some(JsonKind::NullValue(0)),
                                },
                                prost_types::Value {
                                    kind: Some(JsonKind::StringValue("ü".into())),
                                },
                            ],
                        })),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        })),
    };
    let cases = vec![
        ("raw", raw(&all_bytes)),
        ("text", text("héllo wörld")),
        (
            "json",
            Some(pb::CacheValue {
                kind: Some(Kind::Json(json)),
            }),
        ),
        ("empty", raw(b"")),
    ];
    for (key, value) in cases {
        let set = c
            .set(set_req(CacheLevel::Db, key, value.clone(), secs(60)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(set.ttl, secs(60));
        let got = c
            .get(get_req(CacheLevel::Db, key))
            .await
            .unwrap()
            .into_inner();
        assert!(got.found, "{key}");
        assert_eq!(got.value, value, "{key}");
        assert_eq!(got.size_bytes, set.size_bytes);
        assert_eq!(got.stored_size_bytes, set.stored_size_bytes);
        let ttl = got.ttl.unwrap();
        assert!(ttl.seconds <= 60 && ttl.seconds >= 55, "{key}: {ttl:?}");
    }
}

/// Reading an absent key answers found=false and nothing else.
async fn a_miss_is_not_an_error(env: Env) {
    let got = env
        .cache()
        .get(get_req(CacheLevel::App, "nope"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, pb::GetResponse::default());
}

/// No TTL means CACHE_DEFAULT_TTL (3600 s), or 300 s on the api level; an
/// unspecified level is app.
async fn default_ttls_follow_the_level(env: Env) {
    let mut c = env.cache();
    let app = c
        .set(set_req(CacheLevel::Unspecified, "k", text("v"), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(app.ttl, secs(3600));
    let api = c
        .set(set_req(CacheLevel::Api, "k", text("v"), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(api.ttl, secs(300));
    let got = c
        .get(get_req(CacheLevel::App, "k"))
        .await
        .unwrap()
        .into_inner();
    assert!(got.found, "unspecified level must be app");
    assert!(got.ttl.unwrap().seconds > 3500);
}

/// The same key in two levels names two entries.
async fn levels_are_separate_namespaces(env: Env) {
    let mut c = env.cache();
    c.set(set_req(CacheLevel::App, "user:1", text("app"), None))
        .await
        .unwrap();
    c.set(set_req(
        CacheLevel::Session,
        "user:1",
        text("session"),
        None,
    ))
    .await
    .unwrap();
    let app = c
        .get(get_req(CacheLevel::App, "user:1"))
        .await
        .unwrap()
        .into_inner();
    let session = c
        .get(get_req(CacheLevel::Session, "user:1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(app.value, text("app"));
    assert_eq!(session.value, text("session"));
    assert!(
        !c.get(get_req(CacheLevel::Db, "user:1"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    let del = c
        .delete(pb::DeleteRequest {
            level: CacheLevel::App as i32,
            key: "user:1".into(),
        })
        .await
        .unwrap();
    assert!(del.into_inner().deleted);
    assert!(
        c.get(get_req(CacheLevel::Session, "user:1"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    let again = c
        .delete(pb::DeleteRequest {
            level: CacheLevel::App as i32,
            key: "user:1".into(),
        })
        .await
        .unwrap();
    assert!(!again.into_inner().deleted);
}

/// An entry is readable before its TTL and gone after it (expiry is not an
/// event, so the test polls, and checks it did not vanish early).
async fn entries_expire_after_their_ttl(env: Env) {
    let mut c = env.cache();
    let set_at = Instant::now();
    c.set(set_req(
        CacheLevel::Session,
        "short",
        text("v"),
        millis(300),
    ))
    .await
    .unwrap();
    c.set(set_req(CacheLevel::Session, "long", text("v"), secs(60)))
        .await
        .unwrap();
    let first = c
        .get(get_req(CacheLevel::Session, "short"))
        .await
        .unwrap()
        .into_inner();
    if set_at.elapsed() < Duration::from_millis(250) {
        assert!(first.found, "expired early");
    }
    let gone_at = loop {
        let got = c
            .get(get_req(CacheLevel::Session, "short"))
            .await
            .unwrap()
            .into_inner();
        if !got.found {
            break set_at.elapsed();
        }
        assert!(set_at.elapsed() < Duration::from_secs(10), "never expired");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(
        gone_at >= Duration::from_millis(300),
        "gone after {gone_at:?}"
    );
    assert!(
        c.get(get_req(CacheLevel::Session, "long"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
}

/// Values just below, at and above CACHE_COMPRESSION_THRESHOLD (1024): only
/// above is compressed, only when that is smaller, and every byte comes back.
async fn compression_threshold_boundaries_are_byte_exact(env: Env) {
    let mut c = env.cache();
    for (len, compressible, expect_compressed) in [
        (1023, true, false),
        (1024, true, false),
        (1025, true, true),
        (4096, false, false),
        (4096, true, true),
    ] {
        let value: Vec<u8> = if compressible {
            (0..len).map(|i| b"abcd"[i % 4]).collect()
        } else {
            let mut v = vec![0u8; len];
            rand::Rng::fill(&mut rand::rng(), &mut v[..]);
            v
        };
        let key = format!("v{len}-{compressible}");
        let set = c
            .set(set_req(CacheLevel::App, &key, raw(&value), None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(set.compressed, expect_compressed, "{key}");
        assert_eq!(set.size_bytes, len as i64);
        if expect_compressed {
            assert!(set.stored_size_bytes < len as i64, "{key}: {set:?}");
        }
        let got = c
            .get(get_req(CacheLevel::App, &key))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.compressed, expect_compressed);
        assert_eq!(bytes_of(&got), value, "{key}");
    }
    let m = common::cache_metrics(&mut c).await;
    assert!(m.bytes_saved > 0, "{m:?}");
    assert_eq!(m.bytes_saved, m.bytes_written_raw - m.bytes_written_stored);
    // A tag block is not compression's doing: tagged writes of values too
    // small to compress leave the saving where it was (it never goes back)
    for i in 0..10 {
        let mut req = set_req(CacheLevel::App, &format!("tagged{i}"), raw(b"x"), None);
        req.tags = vec!["a-tag-of-some-length".into(), "another".into()];
        c.set(req).await.unwrap();
    }
    let after = common::cache_metrics(&mut c).await;
    assert_eq!(after.bytes_saved, m.bytes_saved, "{after:?}");
    assert_eq!(after.bytes_written_raw, m.bytes_written_raw + 10);
}

/// At CACHE_MAX_VALUE_SIZE a value is stored and read back (so the gRPC limit
/// was raised); one byte over is INVALID_ARGUMENT with nothing written; far
/// over the transport limit is refused by tonic (OUT_OF_RANGE).
async fn size_limit_boundaries(env: Env) {
    let mut c = env.cache();
    let limit = 10 * 1024 * 1024;
    for len in [limit - 1, limit] {
        let mut v = vec![0u8; len];
        rand::Rng::fill(&mut rand::rng(), &mut v[..]);
        c.set(set_req(CacheLevel::App, "big", raw(&v), None))
            .await
            .unwrap();
        let got = c
            .get(get_req(CacheLevel::App, "big"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.size_bytes, len as i64);
        assert!(bytes_of(&got) == v, "value of {len} bytes changed");
    }
    let over = vec![7u8; limit + 1];
    let err = c
        .set(set_req(CacheLevel::App, "over", raw(&over), None))
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "value");
    assert!(
        err.message().contains("10485761 bytes"),
        "{}",
        err.message()
    );
    assert!(
        !c.get(get_req(CacheLevel::App, "over"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    let huge = vec![7u8; limit + 2 * 1024 * 1024];
    let err = c
        .set(set_req(CacheLevel::App, "huge", raw(&huge), None))
        .await
        .unwrap_err();
    // tonic's own refusal of an oversized message
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    assert!(
        !c.get(get_req(CacheLevel::App, "huge"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
}

/// Every kind of bad argument is INVALID_ARGUMENT naming its field.
async fn bad_input_is_refused_naming_the_field(env: Env) {
    let mut c = env.cache();
    let long_key = "k".repeat(1025);
    let nan = Some(pb::CacheValue {
        kind: Some(Kind::Json(prost_types::Value {
            kind: Some(JsonKind::NumberValue(f64::NAN)),
        })),
    });
    let cases: Vec<(pb::SetRequest, &str)> = vec![
        (set_req(CacheLevel::App, "", text("v"), None), "key"),
        (set_req(CacheLevel::App, &long_key, text("v"), None), "key"),
        (
            pb::SetRequest {
                level: 9,
                ..set_req(CacheLevel::App, "k", text("v"), None)
            },
            "level",
        ),
        (set_req(CacheLevel::App, "k", None, None), "value"),
        (
            set_req(
                CacheLevel::App,
                "k",
                Some(pb::CacheValue { kind: None }),
                None,
            ),
            "value",
        ),
        (set_req(CacheLevel::App, "k", nan, None), "value.json"),
        (set_req(CacheLevel::App, "k", text("v"), secs(-5)), "ttl"),
        (set_req(CacheLevel::App, "k", text("v"), secs(0)), "ttl"),
        (
            set_req(CacheLevel::App, "k", text("v"), secs(200 * 365 * 24 * 3600)),
            "ttl",
        ),
    ];
    for (req, field) in cases {
        let err = c.set(req.clone()).await.unwrap_err();
        assert_eq!(bad_field(&err), field, "{req:?}");
    }
    // a key of exactly KOO_MAX_KEY_SIZE is fine
    c.set(set_req(CacheLevel::App, &"k".repeat(1024), text("v"), None))
        .await
        .unwrap();
    let err = c.get(get_req(CacheLevel::App, "")).await.unwrap_err();
    assert_eq!(bad_field(&err), "key");
    let list = |pattern: &str, page_size: i32, token: &str| pb::ListKeysRequest {
        level: 0,
        pattern: pattern.into(),
        page_size,
        page_token: token.into(),
    };
    for (req, field) in [
        (list("[abc", 10, ""), "pattern"),
        (list("abc\\", 10, ""), "pattern"),
        (list(&"*".repeat(1025), 10, ""), "pattern"),
        (list("*", -1, ""), "page_size"),
        (list("*", 10, "not-a-token"), "page_token"),
    ] {
        let err = c.list_keys(req.clone()).await.unwrap_err();
        assert_eq!(bad_field(&err), field, "{req:?}");
    }
    let too_many: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let err = c
        .get_many(pb::GetManyRequest {
            level: 0,
            keys: too_many.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "keys");
    let err = c
        .get_many(pb::GetManyRequest {
            level: 0,
            keys: vec!["a".into(), "".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "keys[1]");
    let err = c
        .delete_many(pb::DeleteManyRequest {
            level: 0,
            keys: too_many,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "keys");
    let err = c
        .watch_metrics(pb::WatchMetricsRequest {
            interval: millis(10),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "interval");
}

/// A message with a non-UTF-8 `string` field, or with the wrong wire types,
/// is INVALID_ARGUMENT; the server then keeps serving.
async fn malformed_protobuf_is_invalid_argument_and_server_keeps_serving(env: Env) {
    /// GetRequest's wire shape, but with bytes where the key string goes.
    #[derive(Clone, PartialEq, prost::Message)]
    struct BytesKey {
        #[prost(int32, tag = "1")]
        level: i32,
        #[prost(bytes = "vec", tag = "2")]
        key: Vec<u8>,
    }
    /// A length-delimited field where GetRequest has a varint.
    #[derive(Clone, PartialEq, prost::Message)]
    struct WrongWire {
        #[prost(bytes = "vec", tag = "1")]
        level: Vec<u8>,
    }
    async fn call<M: prost::Message + Send + Sync + 'static>(env: &Env, msg: M) -> tonic::Status {
        let mut grpc = tonic::client::Grpc::new(env.server.channel.clone());
        grpc.ready().await.unwrap();
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/koo.cache.v1.CacheService/Get");
        let codec = tonic_prost::ProstCodec::<M, pb::GetResponse>::default();
        grpc.unary(tonic::Request::new(msg), path, codec)
            .await
            .unwrap_err()
    }
    let err = call(
        &env,
        BytesKey {
            level: 1,
            key: vec![0xff, 0xfe, b'k'],
        },
    )
    .await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("not a valid protobuf message"),
        "{}",
        err.message()
    );
    let err = call(
        &env,
        WrongWire {
            level: vec![1, 2, 3],
        },
    )
    .await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut c = env.cache();
    c.set(set_req(CacheLevel::App, "still", text("here"), None))
        .await
        .unwrap();
    assert!(
        c.get(get_req(CacheLevel::App, "still"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
}

/// GetMany answers in request order with misses and duplicates; SetMany
/// writes across levels; DeleteMany counts what existed.
async fn batch_operations(env: Env) {
    let mut c = env.cache();
    let set = c
        .set_many(pb::SetManyRequest {
            entries: vec![
                entry(CacheLevel::Db, "a", text("1")),
                entry(CacheLevel::Db, "b", raw(&[2])),
                pb::CacheEntry {
                    ttl: secs(30),
                    ..entry(CacheLevel::Api, "a", text("api"))
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.results.len(), 3);
    assert_eq!(set.results[0].ttl, secs(3600));
    assert_eq!(set.results[2].ttl, secs(30));
    let keys: Vec<String> = ["b", "missing", "a", "b"].map(String::from).to_vec();
    let got = c
        .get_many(pb::GetManyRequest {
            level: CacheLevel::Db as i32,
            keys: keys.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let seen: Vec<(String, bool)> = got
        .results
        .iter()
        .map(|r| (r.key.clone(), r.entry.as_ref().unwrap().found))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("b".into(), true),
            ("missing".into(), false),
            ("a".into(), true),
            ("b".into(), true)
        ]
    );
    assert_eq!(got.results[2].entry.as_ref().unwrap().value, text("1"));
    let del = c
        .delete_many(pb::DeleteManyRequest {
            level: CacheLevel::Db as i32,
            keys: ["a", "b", "zzz"].map(String::from).to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.deleted_count, 2);
    assert!(
        c.get(get_req(CacheLevel::Api, "a"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    let empty = c
        .get_many(pb::GetManyRequest {
            level: 0,
            keys: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.results.is_empty());
}

/// One bad entry in a SetMany refuses the whole batch, naming the entry, and
/// writes nothing.
async fn set_many_is_all_or_nothing(env: Env) {
    let mut c = env.cache();
    let err = c
        .set_many(pb::SetManyRequest {
            entries: vec![
                entry(CacheLevel::App, "good", text("1")),
                pb::CacheEntry {
                    ttl: secs(-1),
                    ..entry(CacheLevel::App, "bad", text("2"))
                },
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "entries[1].ttl");
    let err = c
        .set_many(pb::SetManyRequest {
            entries: vec![
                entry(CacheLevel::App, "good", text("1")),
                entry(CacheLevel::App, "", text("2")),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "entries[1].key");
    assert!(
        !c.get(get_req(CacheLevel::App, "good"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
}

/// Paging with small pages returns every key of the level at least once and
/// nothing else, then an empty token.
async fn list_keys_pages_through_everything(env: Env) {
    let mut c = env.cache();
    let entries: Vec<pb::CacheEntry> = (0..250)
        .map(|i| entry(CacheLevel::Db, &format!("item:{i:03}"), text("v")))
        .collect();
    c.set_many(pb::SetManyRequest { entries }).await.unwrap();
    c.set(set_req(
        CacheLevel::App,
        "item:other-level",
        text("v"),
        None,
    ))
    .await
    .unwrap();
    let mut seen = BTreeSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_keys(pb::ListKeysRequest {
                level: CacheLevel::Db as i32,
                pattern: "item:*".into(),
                page_size: 40,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.keys.len() <= 40, "page of {}", page.keys.len());
        seen.extend(page.keys);
        pages += 1;
        assert!(pages < 1000, "listing never ended");
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: BTreeSet<String> = (0..250).map(|i| format!("item:{i:03}")).collect();
    assert_eq!(seen, expected);
    // a token is bound to its level and pattern
    let first = c
        .list_keys(pb::ListKeysRequest {
            level: CacheLevel::Db as i32,
            pattern: "item:*".into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let err = c
        .list_keys(pb::ListKeysRequest {
            level: CacheLevel::Db as i32,
            pattern: "*".into(),
            page_size: 10,
            page_token: first.next_page_token,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "page_token");
}

/// Glob metacharacters in keys are matched only when escaped, and no pattern
/// reaches another level.
async fn list_keys_patterns_stay_in_the_level(env: Env) {
    let mut c = env.cache();
    for key in ["a*b", "axb", "a?b", "[x]", "user:1", "user:2", "session:9"] {
        c.set(set_req(CacheLevel::Session, key, text("v"), None))
            .await
            .unwrap();
    }
    c.set(set_req(CacheLevel::Api, "user:3", text("v"), None))
        .await
        .unwrap();
    let list = |pattern: &str| pb::ListKeysRequest {
        level: CacheLevel::Session as i32,
        pattern: pattern.into(),
        page_size: 1000,
        page_token: String::new(),
    };
    let keys = |resp: pb::ListKeysResponse| {
        assert!(resp.next_page_token.is_empty());
        resp.keys.into_iter().collect::<BTreeSet<_>>()
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        keys(c.list_keys(list("a\\*b")).await.unwrap().into_inner()),
        set(&["a*b"])
    );
    assert_eq!(
        keys(c.list_keys(list("a*b")).await.unwrap().into_inner()),
        set(&["a*b", "axb", "a?b"])
    );
    assert_eq!(
        keys(c.list_keys(list("\\[x\\]")).await.unwrap().into_inner()),
        set(&["[x]"])
    );
    assert_eq!(
        keys(c.list_keys(list("user:*")).await.unwrap().into_inner()),
        set(&["user:1", "user:2"])
    );
    assert_eq!(
        keys(c.list_keys(list("")).await.unwrap().into_inner()).len(),
        7
    );
    assert_eq!(
        keys(c.list_keys(list("*:cache:*")).await.unwrap().into_inner()),
        set(&[])
    );
}

/// ClearLevel removes the level's keys, reports how many, and leaves other
/// levels alone.
async fn clear_level_removes_only_that_level(env: Env) {
    let mut c = env.cache();
    let entries = (0..30)
        .map(|i| entry(CacheLevel::Api, &format!("k{i}"), text("v")))
        .collect();
    c.set_many(pb::SetManyRequest { entries }).await.unwrap();
    c.set(set_req(CacheLevel::App, "k1", text("keep"), None))
        .await
        .unwrap();
    let cleared = c
        .clear_level(pb::ClearLevelRequest {
            level: CacheLevel::Api as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.deleted_count, 30);
    assert!(
        !c.get(get_req(CacheLevel::Api, "k1"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    assert!(
        c.get(get_req(CacheLevel::App, "k1"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    let again = c
        .clear_level(pb::ClearLevelRequest {
            level: CacheLevel::Api as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.deleted_count, 0);
}

/// Hits, misses, sets, deletes, ratios, key counts and latency counts are
/// reported per level and in total.
async fn metrics_count_per_level(env: Env) {
    let mut c = env.cache();
    c.set(set_req(CacheLevel::Db, "a", text("v"), None))
        .await
        .unwrap();
    c.set(set_req(CacheLevel::Db, "b", text("v"), None))
        .await
        .unwrap();
    for key in ["a", "a", "b", "zz"] {
        c.get(get_req(CacheLevel::Db, key)).await.unwrap();
    }
    c.delete(pb::DeleteRequest {
        level: CacheLevel::Db as i32,
        key: "b".into(),
    })
    .await
    .unwrap();
    c.get(get_req(CacheLevel::Session, "x")).await.unwrap();
    let m = common::cache_metrics(&mut c).await;
    let db = m
        .levels
        .iter()
        .find(|l| l.level == CacheLevel::Db as i32)
        .unwrap()
        .counters
        .unwrap();
    assert_eq!(
        (db.hits, db.misses, db.sets, db.deletes, db.errors, db.keys),
        (3, 1, 2, 1, 0, 1)
    );
    assert!((db.hit_ratio - 0.75).abs() < 1e-9);
    let total = m.total.unwrap();
    assert_eq!((total.hits, total.misses, total.keys), (3, 2, 1));
    assert!((total.hit_ratio - 0.6).abs() < 1e-9);
    let get = m.latencies.iter().find(|l| l.operation == "get").unwrap();
    assert_eq!(get.count, 5);
    // per level: every operation that named that one level
    let level_count = |level: CacheLevel| {
        let l = m.levels.iter().find(|l| l.level == level as i32).unwrap();
        let latency = l.latency.clone().unwrap();
        assert_eq!(latency.operation, "all");
        latency.count
    };
    assert_eq!(
        [CacheLevel::Db, CacheLevel::Session, CacheLevel::App].map(level_count),
        [7, 1, 0],
        "db: 2 sets, 4 gets, 1 delete; session: 1 get"
    );
    let (p50, p99) = (get.p50.unwrap(), get.p99.unwrap());
    assert!((p50.seconds, p50.nanos) <= (p99.seconds, p99.nanos));
    assert_eq!(m.instance_count, 1);
    assert!(!m.partial, "{}", m.partial_reason);
    assert!(m.backend_used_memory_bytes > 0);
}

/// WatchMetrics sends a snapshot at once and then one per interval, each
/// newer than the last and reflecting traffic in between.
async fn watch_metrics_streams_successive_snapshots(env: Env) {
    let mut c = env.cache();
    let mut stream = c
        .watch_metrics(pb::WatchMetricsRequest {
            interval: millis(100),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last_time = None;
    for round in 0..3i64 {
        let msg = tokio::time::timeout(common::EVENT_TIMEOUT, stream.message())
            .await
            .expect("snapshot in time")
            .unwrap()
            .expect("stream open");
        let m = msg.metrics.unwrap();
        let sets = m.total.unwrap().sets;
        // one Set follows each snapshot, so snapshot n has seen at least n
        if round == 0 {
            assert_eq!(sets, 0, "{m:?}");
        } else {
            assert!(sets >= round, "{round}: {m:?}");
        }
        let t = m.sample_time.unwrap();
        if let Some(prev) = last_time.replace(t) {
            assert!((t.seconds, t.nanos) > (prev.seconds, prev.nanos));
        }
        c.set(set_req(CacheLevel::App, "tick", text("v"), None))
            .await
            .unwrap();
    }
}

/// GetHealth answers healthy with the backend kind and a ping time, and the
/// standard health service says SERVING for the server and CacheService.
async fn health_reports_the_backend(env: Env) {
    env.cache()
        .set(set_req(CacheLevel::App, "k", text("v"), None))
        .await
        .unwrap();
    let h = env
        .cache()
        .get_health(pb::GetHealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(h.healthy);
    let kind = if env.is_redis() {
        pb::BackendKind::Redis
    } else {
        pb::BackendKind::Memory
    };
    assert_eq!(h.backend, kind as i32);
    assert_eq!(h.circuit_state, pb::CircuitState::Closed as i32);
    assert!(h.ping_latency.is_some());
    assert!(h.used_memory_bytes > 0);
    assert!(!h.version.is_empty());
    for service in ["", "koo.cache.v1.CacheService"] {
        let status = env
            .server
            .health()
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
}

/// Warm loads entries from the request and the warm file, reports the
/// file's bad ones by line, refuses a bad one in the request as SetMany
/// does, and re-reads the file each time.
async fn warm_loads_request_and_file_entries(env: Env) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warm.jsonl");
    std::fs::write(
        &path,
        "# critical entries\n\
         {\"level\":\"db\",\"key\":\"w1\",\"json\":{\"a\":1},\"ttl\":\"90s\"}\n\
         \n\
         {\"key\":\"w2\",\"text\":\"two\"}\n\
         {\"key\":\"w3\",\"text\":\"x\",\"level\":\"disk\"}\n\
         not json\n",
    )
    .unwrap();
    // This env's server has no warm file: start one of the same kind that has.
    let file = path.clone();
    let env = env.same_kind_with(|s| s.cache.warm_file = Some(file)).await;
    let mut c = env.cache();
    let refused = c
        .warm(pb::WarmRequest {
            entries: vec![
                entry(CacheLevel::Api, "r1", text("req")),
                entry(CacheLevel::Api, "", text("bad")),
            ],
            skip_file: false,
            wait: true,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().starts_with("entries[1].key"),
        "{refused:?}"
    );
    assert!(
        !c.get(get_req(CacheLevel::Api, "r1"))
            .await
            .unwrap()
            .into_inner()
            .found,
        "nothing of a refused warm-up is written"
    );
    let report = c
        .warm(pb::WarmRequest {
            entries: vec![entry(CacheLevel::Api, "r1", text("req"))],
            skip_file: false,
            wait: true,
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(report.loaded, 3, "{report:?}");
    assert_eq!(report.file, path.display().to_string());
    let failures: Vec<(String, i64)> = report
        .failures
        .iter()
        .map(|f| (f.source.clone(), f.line))
        .collect();
    assert_eq!(
        failures,
        vec![
            (path.display().to_string(), 5),
            (path.display().to_string(), 6)
        ]
    );
    assert!(
        report.failures[0].reason.contains("disk"),
        "{:?}",
        report.failures[0]
    );
    let w1 = c
        .get(get_req(CacheLevel::Db, "w1"))
        .await
        .unwrap()
        .into_inner();
    assert!(w1.found && w1.ttl.unwrap().seconds <= 90);
    assert!(
        c.get(get_req(CacheLevel::App, "w2"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    assert!(
        c.get(get_req(CacheLevel::Api, "r1"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    // edits take effect on the next warm-up; skip_file skips it
    std::fs::write(&path, "{\"key\":\"w4\",\"text\":\"four\"}\n").unwrap();
    let again = c
        .warm(pb::WarmRequest {
            entries: vec![],
            skip_file: false,
            wait: true,
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!((again.loaded, again.failures.len()), (1, 0));
    let skipped = c
        .warm(pb::WarmRequest {
            entries: vec![],
            skip_file: true,
            wait: true,
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!((skipped.loaded, skipped.file.as_str()), (0, ""));
    // a missing file is a configuration error
    std::fs::remove_file(&path).unwrap();
    let err = c
        .warm(pb::WarmRequest {
            entries: vec![],
            skip_file: false,
            wait: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // the upkeep task's end and its stored error, typed by the domain
    assert!(
        err.message().starts_with("task cache~") && err.message().contains(" ended failed: "),
        "{}",
        err.message()
    );
}

/// Maintenance runs a cleanup and names the largest keys, largest first.
async fn maintenance_reports_largest_keys(env: Env) {
    let mut c = env.cache();
    let mut big = vec![0u8; 64 * 1024];
    rand::Rng::fill(&mut rand::rng(), &mut big[..]);
    c.set(set_req(CacheLevel::Db, "big", raw(&big), None))
        .await
        .unwrap();
    c.set(set_req(CacheLevel::App, "small", text("s"), None))
        .await
        .unwrap();
    let r = c
        .start_maintenance(pb::StartMaintenanceRequest { wait: true })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.task_id.is_empty());
    let report = r.report.unwrap();
    assert_eq!(report.sampled_keys, 2);
    assert_eq!(report.largest_keys[0].key, "big");
    assert_eq!(report.largest_keys[0].level, CacheLevel::Db as i32);
    assert!(report.largest_keys[0].size_bytes >= 64 * 1024);
    assert!(report.used_memory_bytes > 0);
    assert!(report.cleanup.is_some());
}

on_all_stores!(list_keys_returns_survivors_while_keys_churn);

/// Keys that exist for the whole listing are all returned even when keys
/// already returned are deleted between pages (a cache churns constantly).
async fn list_keys_returns_survivors_while_keys_churn(env: Env) {
    let mut c = env.cache();
    let entries = (0..60)
        .map(|i| entry(CacheLevel::Db, &format!("churn:{i:02}"), text("v")))
        .collect();
    c.set_many(pb::SetManyRequest { entries }).await.unwrap();
    let mut seen = BTreeSet::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_keys(pb::ListKeysRequest {
                level: CacheLevel::Db as i32,
                pattern: "churn:*".into(),
                page_size: 7,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        // delete what was just returned: the survivors must still all come back
        c.delete_many(pb::DeleteManyRequest {
            level: CacheLevel::Db as i32,
            keys: page.keys.clone(),
        })
        .await
        .unwrap();
        seen.extend(page.keys);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: BTreeSet<String> = (0..60).map(|i| format!("churn:{i:02}")).collect();
    assert_eq!(seen, expected);
}

/// A GetMany whose reply would pass the message limit is RESOURCE_EXHAUSTED;
/// fewer keys go through. The limit here is small so the test stays quick.
async fn get_many_reply_limit(env: Env) {
    let mut c = env.cache();
    let mut v = vec![0u8; 900 * 1024];
    rand::Rng::fill(&mut rand::rng(), &mut v[..]);
    for k in ["a", "b", "c"] {
        c.set(set_req(CacheLevel::App, k, raw(&v), None))
            .await
            .unwrap();
    }
    let keys = |n: usize| ["a", "b", "c"][..n].iter().map(|s| s.to_string()).collect();
    let err = c
        .get_many(pb::GetManyRequest {
            level: 0,
            keys: keys(3),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let ok = c
        .get_many(pb::GetManyRequest {
            level: 0,
            keys: keys(2),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.results.iter().all(|r| r.entry.as_ref().unwrap().found));
}

fn one_mib_limit(s: &mut koo::server::Settings) {
    s.cache.max_value_size = 1024 * 1024;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_reply_limit_memory() {
    get_many_reply_limit(Env::memory_with(one_mib_limit).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_reply_limit_redis() {
    get_many_reply_limit(Env::redis_with(one_mib_limit).await).await;
}

/// A JSON value whose protobuf form passes CACHE_MAX_VALUE_SIZE is refused
/// on `value.json` (so whatever is accepted can be sent back), even though
/// its JSON text is smaller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_limit_applies_to_the_protobuf_form() {
    let env = Env::memory_with(one_mib_limit).await;
    let numbers = |n: usize| prost_types::Value {
        kind: Some(JsonKind::ListValue(prost_types::ListValue {
            values: (0..n)
                .map(|i| prost_types::Value {
                    kind: Some(JsonKind::NumberValue(i as f64)),
                })
                .collect(),
        })),
    };
    let json = |v| {
        Some(pb::CacheValue {
            kind: Some(Kind::Json(v)),
        })
    };
    // ~11 protobuf bytes per number, ~5 bytes of JSON text
    let err = env
        .cache()
        .set(set_req(
            CacheLevel::App,
            "big",
            json(numbers(120_000)),
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "value.json");
    env.cache()
        .set(set_req(CacheLevel::App, "ok", json(numbers(50_000)), None))
        .await
        .unwrap();
    let got = env
        .cache()
        .get(get_req(CacheLevel::App, "ok"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, json(numbers(50_000)));
}
