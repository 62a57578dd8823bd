//! Cache tags, `InvalidateTags` and soft TTLs end to end: on both stores
//! through a real channel, across two `koo serve` binaries on one Redis, and
//! the tag keys' sizes and TTLs read in Redis itself.

use crate::common;

use std::time::Duration;

use common::Env;
use common::chaos::{KooProc, lazy_channel};
use koo::pb::cache::v1::{self as pb, CacheLevel, cache_service_client::CacheServiceClient};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

type Client = CacheServiceClient<Channel>;

fn text(s: &str) -> Option<pb::CacheValue> {
    Some(pb::CacheValue {
        kind: Some(pb::cache_value::Kind::Text(s.into())),
    })
}

fn ms(ms: u64) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(Duration::from_millis(ms)).ok()
}

fn entry(level: CacheLevel, key: &str, tags: &[&str]) -> pb::CacheEntry {
    pb::CacheEntry {
        level: level as i32,
        key: key.into(),
        value: text(key),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

fn set_req(level: CacheLevel, key: &str, tags: &[&str]) -> pb::SetRequest {
    pb::SetRequest {
        level: level as i32,
        key: key.into(),
        value: text(key),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

fn invalidate(level: Option<CacheLevel>, tags: &[&str]) -> pb::InvalidateTagsRequest {
    pb::InvalidateTagsRequest {
        level: level.map_or(0, |l| l as i32),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

async fn get(c: &mut Client, level: CacheLevel, key: &str) -> pb::GetResponse {
    c.get(pb::GetRequest {
        level: level as i32,
        key: key.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Which of `keys` of `level` are found, in order.
async fn found(c: &mut Client, level: CacheLevel, keys: &[&str]) -> Vec<bool> {
    let mut out = Vec::new();
    for k in keys {
        out.push(get(c, level, k).await.found);
    }
    out
}

async fn known(c: &mut Client, req: pb::InvalidateTagsRequest) -> i64 {
    c.invalidate_tags(req)
        .await
        .unwrap()
        .into_inner()
        .known_count
}

fn bad_field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_else(|| panic!("no BadRequest detail in {status:?}"))
}

/// The whole tag story between a writer `a` and another client `b` (the
/// same koo, or another instance on the same Redis): a tagged entry reports
/// its tags; invalidating one of them in one level makes exactly the
/// entries carrying it in that level miss; invalidating across every level
/// reaches the rest; untagged and other-tag entries are untouched; a tag
/// written again after its invalidation works afresh; SetMany/GetMany carry
/// tags and GetMany drops invalidated entries.
async fn tag_scenario(mut a: Client, mut b: Client) {
    use CacheLevel::{App, Db};
    a.set(set_req(App, "k1", &["t1", "t2", "t1"]))
        .await
        .unwrap();
    a.set(set_req(App, "k2", &["t3"])).await.unwrap();
    a.set(set_req(App, "k3", &[])).await.unwrap();
    a.set(set_req(Db, "k4", &["t1"])).await.unwrap();
    let got = get(&mut b, App, "k1").await;
    assert!(got.found);
    assert_eq!(got.tags, ["t1", "t2"], "duplicates are dropped");
    assert!(!got.stale && got.soft_ttl.is_none());
    assert_eq!(get(&mut b, App, "k3").await.tags, Vec::<String>::new());

    assert_eq!(known(&mut b, invalidate(Some(App), &["t1"])).await, 1);
    assert_eq!(
        found(&mut a, App, &["k1", "k2", "k3"]).await,
        [false, true, true]
    );
    assert_eq!(
        found(&mut b, App, &["k1", "k2", "k3"]).await,
        [false, true, true]
    );
    assert!(
        get(&mut a, Db, "k4").await.found,
        "another level's t1 is untouched"
    );

    // every level: app's t1 and db's t1 both exist
    assert_eq!(known(&mut a, invalidate(None, &["t1", "nope"])).await, 2);
    assert!(!get(&mut b, Db, "k4").await.found);
    assert_eq!(known(&mut a, invalidate(None, &["never-used"])).await, 0);

    // written again, the entry hits under the tag's new version
    a.set(set_req(App, "k1", &["t1"])).await.unwrap();
    assert!(get(&mut b, App, "k1").await.found);

    let entries = vec![
        entry(App, "m1", &["ta"]),
        entry(App, "m2", &["tb"]),
        entry(App, "m3", &["ta", "tb"]),
        entry(App, "m4", &[]),
    ];
    a.set_many(pb::SetManyRequest { entries }).await.unwrap();
    let keys: Vec<String> = ["m1", "m2", "m3", "m4"].map(String::from).to_vec();
    let many = |c: &mut Client| {
        let mut c = c.clone();
        let keys = keys.clone();
        async move {
            c.get_many(pb::GetManyRequest {
                level: App as i32,
                keys,
            })
            .await
            .unwrap()
            .into_inner()
            .results
        }
    };
    let before = many(&mut b).await;
    assert!(before.iter().all(|r| r.entry.as_ref().unwrap().found));
    assert_eq!(before[2].entry.as_ref().unwrap().tags, ["ta", "tb"]);
    assert_eq!(known(&mut b, invalidate(Some(App), &["ta"])).await, 1);
    let after: Vec<bool> = many(&mut a)
        .await
        .iter()
        .map(|r| r.entry.as_ref().unwrap().found)
        .collect();
    assert_eq!(after, [false, true, false, true]);
}

async fn same_instance(env: Env) {
    tag_scenario(env.cache(), env.cache()).await;
}

/// After its soft TTL an entry is still served, marked stale; before it,
/// the time left is reported; a soft TTL not under the TTL is refused.
async fn soft_ttl_marks_stale(env: Env) {
    let mut c = env.cache();
    c.set(pb::SetRequest {
        ttl: ms(10_000),
        soft_ttl: ms(300),
        ..set_req(CacheLevel::App, "s", &["t"])
    })
    .await
    .unwrap();
    let fresh = get(&mut c, CacheLevel::App, "s").await;
    assert!(fresh.found && !fresh.stale, "{fresh:?}");
    let left = Duration::try_from(fresh.soft_ttl.unwrap()).unwrap();
    assert!(
        left > Duration::ZERO && left <= Duration::from_millis(300),
        "{left:?}"
    );
    assert_eq!(fresh.tags, ["t"]);
    tokio::time::sleep(left + Duration::from_millis(20)).await;
    let stale = get(&mut c, CacheLevel::App, "s").await;
    assert!(
        stale.found && stale.stale && stale.soft_ttl.is_none(),
        "{stale:?}"
    );
    assert_eq!(stale.value, text("s"));
    let many = c
        .get_many(pb::GetManyRequest {
            level: CacheLevel::App as i32,
            keys: vec!["s".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(many.results[0].entry.as_ref().unwrap().stale);

    let err = c
        .set(pb::SetRequest {
            ttl: ms(1000),
            soft_ttl: ms(1000),
            ..set_req(CacheLevel::App, "s2", &[])
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "soft_ttl");
}

/// Bad tags and tag lists are refused naming the field, on every RPC that
/// takes them.
async fn bad_input_is_named(env: Env) {
    let mut c = env.cache();
    let many: Vec<String> = (0..33).map(|i| format!("t{i}")).collect();
    let mut req = set_req(CacheLevel::App, "k", &[]);
    req.tags = many;
    assert_eq!(bad_field(&c.set(req).await.unwrap_err()), "tags");
    let err = c
        .set(set_req(CacheLevel::App, "k", &["a", "b", "c", ""]))
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "tags[3]");
    let long = "x".repeat(257);
    let mut entries = vec![entry(CacheLevel::App, "a", &["ok"]); 2];
    entries.push(entry(CacheLevel::App, "c", &[&long]));
    let err = c
        .set_many(pb::SetManyRequest { entries })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "entries[2].tags[0]");
    assert!(err.message().len() < 1024, "the quote is bounded");
    assert!(
        !get(&mut c, CacheLevel::App, "a").await.found,
        "nothing written"
    );
    let err = c.invalidate_tags(invalidate(None, &[])).await.unwrap_err();
    assert_eq!(bad_field(&err), "tags");
    let thousand_one: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let err = c
        .invalidate_tags(pb::InvalidateTagsRequest {
            level: 0,
            tags: thousand_one,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "tags");
    let err = c
        .invalidate_tags(invalidate(None, &["ok", &long]))
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "tags[1]");
    let err = c
        .invalidate_tags(pb::InvalidateTagsRequest {
            level: 99,
            tags: vec!["a".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "level");
}

on_both_stores!(bad_input_is_named);
on_all_stores!(same_instance, soft_ttl_marks_stale);

/// Two `koo serve` binaries on one fresh Redis.
async fn two_instances(redis: &common::TestRedis, dir: &std::path::Path) -> Vec<KooProc> {
    common::chaos::serve_pair(redis.url(), 0, dir).await
}

fn client(p: &KooProc) -> Client {
    CacheServiceClient::new(lazy_channel(p.port.unwrap()))
}

/// An entry tagged on one instance misses on both after InvalidateTags on
/// the other; untagged and other-tag entries, and other levels, stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_invalidate_across_instances() {
    let redis = common::TestRedis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let procs = two_instances(&redis, dir.path()).await;
    tag_scenario(client(&procs[0]), client(&procs[1])).await;
}

/// The same across two `koo serve` on a Redis Cluster: tag keys and
/// entries spread over the three masters, pipelines split per slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_invalidate_across_instances_on_a_cluster() {
    let cluster = common::cluster::TestCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let procs = common::chaos::serve_pair(cluster.url(), 0, dir.path()).await;
    tag_scenario(client(&procs[0]), client(&procs[1])).await;
}

/// All tag keys in Redis with their PTTL (ms).
async fn tag_keys(redis: &common::TestRedis) -> Vec<(String, i64)> {
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:v1:ctag:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push((k, pttl));
    }
    out.sort();
    out
}

/// Tag bookkeeping in Redis: one key per live (level, tag), outside the
/// cache's keys (ListKeys never shows it), whose PTTL covers the longest
/// entry carrying it and barely more, is never shortened by a shorter
/// entry nor reset by InvalidateTags, and expires with its entries:
/// nothing is left once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_keys_live_as_long_as_their_entries() {
    let env = Env::redis().await;
    let redis = env.redis_server().unwrap();
    let mut c = env.cache();
    let set = |key: &str, ttl: u64, tags: &[&str]| pb::SetRequest {
        ttl: ms(ttl),
        ..set_req(CacheLevel::App, key, tags)
    };
    c.set(set("short", 800, &["x", "y"])).await.unwrap();
    c.set(set("long", 1500, &["x"])).await.unwrap();
    c.set(set("shorter", 300, &["x"])).await.unwrap();
    let keys = tag_keys(redis).await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    let (x, x_ttl) = &keys[0];
    assert!(x.ends_with(":v1:ctag:app:x"), "{x}");
    assert!(
        (1400..=1500).contains(x_ttl),
        "x lives as long as `long`: {x_ttl}"
    );
    let y_ttl = keys[1].1;
    assert!(
        (700..=800).contains(&y_ttl),
        "y lives as long as `short`: {y_ttl}"
    );
    assert_eq!(
        known(&mut c, invalidate(Some(CacheLevel::App), &["x"])).await,
        1
    );
    let after = tag_keys(redis).await;
    assert!(
        after[0].1 > 1000 && after[0].1 <= *x_ttl,
        "TTL kept: {after:?}"
    );
    let listed = c
        .list_keys(pb::ListKeysRequest {
            level: CacheLevel::App as i32,
            pattern: "*".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 3, "only entries are listed: {listed:?}");
    tokio::time::sleep(Duration::from_millis(1550)).await;
    assert_eq!(tag_keys(redis).await, vec![], "the tag keys expired");
    let mut conn = redis.conn().await;
    let left: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    let cache_keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:cache:app:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        cache_keys.is_empty(),
        "entries expired: {cache_keys:?} ({left} keys)"
    );
}

/// An entry whose tags were invalidated is unlinked by the read that finds
/// it dead, not only hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_entry_is_unlinked_when_read() {
    let env = Env::redis().await;
    let redis = env.redis_server().unwrap();
    let mut c = env.cache();
    c.set(set_req(CacheLevel::Api, "gone", &["t"]))
        .await
        .unwrap();
    known(&mut c, invalidate(None, &["t"])).await;
    assert!(!get(&mut c, CacheLevel::Api, "gone").await.found);
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:cache:api:gone")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys, Vec::<String>::new());
}

/// `POST /api/v1/cache/invalidate-tags`, the RPC's REST route: tags set
/// over REST are invalidated over REST, in every level when none is named.
#[test]
fn invalidate_tags_over_rest() {
    use common::rest::{curl, serve_http};
    use serde_json::json;
    let (_koo, http) = serve_http(&[]);
    let post = |path: &str, body: serde_json::Value| {
        curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            &body.to_string(),
            &format!("http://{http}{path}"),
        ])
    };
    let (code, set) = post(
        "/api/v1/cache/set",
        json!({"level": "CACHE_LEVEL_DB", "key": "u:1", "value": {"text": "v"}, "tags": ["user:1"], "soft_ttl": "30s", "ttl": "60s"}),
    );
    assert_eq!(code, 200, "{set}");
    let (_, got) = curl(&[&format!(
        "http://{http}/api/v1/cache/get?level=CACHE_LEVEL_DB&key=u:1"
    )]);
    assert_eq!(got["tags"], json!(["user:1"]), "{got}");
    assert_eq!(got["stale"], false, "{got}");
    let (code, reply) = post("/api/v1/cache/invalidate-tags", json!({"tags": ["user:1"]}));
    assert_eq!((code, &reply["known_count"]), (200, &json!("1")), "{reply}");
    let (_, got) = curl(&[&format!(
        "http://{http}/api/v1/cache/get?level=CACHE_LEVEL_DB&key=u:1"
    )]);
    assert_eq!(got["found"], false, "{got}");
    let (code, bad) = post("/api/v1/cache/invalidate-tags", json!({"tags": []}));
    assert_eq!(code, 400, "{bad}");
    assert_eq!(
        bad["details"][0]["field_violations"][0]["field"], "tags",
        "{bad}"
    );
}

/// The CLI: `cache set --tag --soft-ttl`, `cache get` (tags on stderr, the
/// value alone on stdout), `cache invalidate-tags`, then the get misses.
#[test]
fn cli_tags() {
    let (_koo, _http, grpc) = common::rest::serve_both(&[]);
    let koo = |args: &[&str]| {
        let out = common::koo_command()
            .env("KOO_TARGET", &grpc)
            .args(args)
            .output()
            .expect("run koo");
        (
            out.status.code().expect("exited"),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = koo(&[
        "cache",
        "set",
        "k",
        "v",
        "--text",
        "--tag",
        "a",
        "--tag",
        "b",
        "--soft-ttl",
        "30s",
        "--ttl",
        "60s",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = koo(&["cache", "get", "k"]);
    assert_eq!((code, out.trim()), (0, "v"), "{err}");
    assert!(
        err.contains("tags: [a, b]") && err.contains("fresh for"),
        "{err}"
    );
    let (code, out, err) = koo(&["cache", "invalidate-tags", "b", "--level", "app"]);
    assert_eq!((code, out.trim()), (0, "invalidated 1"), "{err}");
    assert_eq!(koo(&["cache", "get", "k"]).0, 1, "the entry misses");
    let (code, _, err) = koo(&[
        "cache",
        "set",
        "k",
        "v",
        "--text",
        "--soft-ttl",
        "2m",
        "--ttl",
        "1m",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("soft_ttl"), "{err}");
}

/// A task's `cache_result` carries tags and a soft TTL: its cached result
/// reports them and misses once a tag is invalidated; bad tags are refused
/// at submission, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_cached_result_carries_tags() {
    use common::tasks::{Backend, client, is_final, start_on, submit, wait_task};
    use koo::pb::tasks::v1 as tpb;
    let koo = start_on(Backend::Memory, 1).await;
    let mut tasks = client(&koo.server);
    let mut c = koo.server.cache();
    let target = |tags: &[&str]| tpb::CacheTarget {
        level: CacheLevel::Db as i32,
        key: "answer".into(),
        ttl: ms(60_000),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        soft_ttl: ms(30_000),
    };
    let task = tasks
        .submit_task(tpb::SubmitTaskRequest {
            cache_result: Some(target(&["report"])),
            ..submit(
                "koo.diagnostics.fail_times",
                serde_json::json!({"failures": 0}),
            )
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.cache_result.as_ref().unwrap().tags, ["report"]);
    assert!(task.cache_result.as_ref().unwrap().soft_ttl.is_some());
    let done = wait_task(&mut tasks, &task.id, is_final).await;
    assert_eq!(done.state, tpb::TaskState::Succeeded as i32, "{done:?}");
    let cached = get(&mut c, CacheLevel::Db, "answer").await;
    assert!(
        cached.found && !cached.stale && cached.soft_ttl.is_some(),
        "{cached:?}"
    );
    assert_eq!(cached.tags, ["report"]);
    assert_eq!(known(&mut c, invalidate(None, &["report"])).await, 1);
    assert!(!get(&mut c, CacheLevel::Db, "answer").await.found);
    let err = tasks
        .submit_task(tpb::SubmitTaskRequest {
            cache_result: Some(target(&["ok", ""])),
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "cache_result.tags[1]");
}
