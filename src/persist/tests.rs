//! Tests of `persist`.
use super::*;

/// Everything embedded, kept in `dir`.
fn open(dir: &Path) -> Result<Embedded, PersistError> {
    let parts = EmbeddedParts {
        cache: Some(MemoryConfig::default()),
        cache_prefix: "koo".to_owned(),
        tasks: Some(TaskLimits::default()),
    };
    let data = DataSettings {
        dir: Some(dir.to_owned()),
        ..DataSettings::default()
    };
    Embedded::open(parts, &data)
}

/// The cache's tag versions are saved with its entries (so that tagged
/// entries still hit after a restart), and other keys are not.
#[tokio::test]
async fn tag_versions_are_kept_with_the_entries() {
    use crate::store::{CacheBackend, Deadline};
    let d = Deadline::after(std::time::Duration::from_secs(5));
    let minute = std::time::Duration::from_secs(60);
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path()).unwrap();
    let cache = a.cache.clone().unwrap();
    let tag = crate::keys::KeySpace::new("koo").tag_key(crate::domain::Level::Db, "t");
    let version = cache
        .tag_versions_for_write(&[(tag.clone(), minute)], d)
        .await
        .unwrap();
    cache
        .set("koo:cache:db:k", bytes::Bytes::from_static(b"v"), minute, d)
        .await
        .unwrap();
    cache
        .set("other:x", bytes::Bytes::from_static(b"v"), minute, d)
        .await
        .unwrap();
    a.save().unwrap();
    drop((a, cache));
    let b = open(dir.path()).unwrap();
    let cache = b.cache.clone().unwrap();
    assert_eq!(
        cache.tag_versions(&[tag], d).await.unwrap(),
        [Some(version[0])]
    );
    assert!(cache.get("koo:cache:db:k", d).await.unwrap().is_some());
    assert!(cache.get("other:x", d).await.unwrap().is_none());
}

/// A saved file loads back; a flipped byte in the body is caught by the
/// hash and named as corruption rather than loaded.
#[test]
fn save_load_and_corruption_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path()).unwrap();
    a.save().unwrap();
    let file = dir.path().join(FILE_NAME);
    drop(a);
    let b = open(dir.path()).unwrap();
    assert_eq!(b.summary(), "0 tasks, 0 cache entries, 0 schedules");
    drop(b);
    let mut data = std::fs::read(&file).unwrap();
    let last = data.len() - 2;
    data[last] ^= 0x01;
    std::fs::write(&file, &data).unwrap();
    let err = open(dir.path()).err().unwrap();
    assert!(matches!(err, PersistError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(FILE_NAME), "{err}");
}

/// Changes made after the last save come back from the journal when
/// the process ends without saving; the start-up saves them at once and
/// deletes the files it replayed, so the next start replays nothing.
#[tokio::test]
async fn the_journal_is_replayed_then_compacted() {
    use crate::domain::task::TaskId;
    use crate::store::tasks::TaskBackend;
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path()).unwrap();
    a.save().unwrap();
    let task = submit_one(&a).await;
    // a crash: no save, the lock released with the process
    drop(a);
    let journals = |dir: &Path| journal::files(dir).unwrap().len();
    async fn holds(e: &Embedded, id: &TaskId) -> bool {
        let tasks = e.tasks.as_ref().unwrap();
        tasks.get(id, deadline()).await.unwrap().is_some()
    }
    assert_eq!(journals(dir.path()), 1);
    let b = open(dir.path()).unwrap();
    assert!(holds(&b, &task.id).await);
    assert_eq!(
        journals(dir.path()),
        1,
        "the replayed file is gone, a new one begun"
    );
    drop(b);
    let c = open(dir.path()).unwrap();
    assert!(holds(&c, &task.id).await);
    assert_eq!(
        c.summary(),
        "1 tasks (queued 1), 0 cache entries, 0 schedules"
    );
}

/// A journal holding task changes when the tasks now live in Redis
/// stops start-up (as a save holding tasks does), naming the file.
#[tokio::test]
async fn journaled_tasks_moved_to_redis_refuse_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path()).unwrap();
    submit_one(&a).await;
    drop(a);
    let parts = EmbeddedParts {
        cache: Some(MemoryConfig::default()),
        cache_prefix: "koo".to_owned(),
        tasks: None,
    };
    let data = DataSettings {
        dir: Some(dir.path().to_owned()),
        ..DataSettings::default()
    };
    let err = Embedded::open(parts, &data).err().unwrap();
    assert!(matches!(err, PersistError::Moved { .. }), "{err}");
    assert!(err.to_string().contains("journal-"), "{err}");
}

/// The lock is exclusive while held and free once its holder is gone.
#[test]
fn the_lock_is_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let held = DataDir::lock(dir.path()).unwrap();
    let err = DataDir::lock(dir.path()).err().unwrap();
    assert!(matches!(err, PersistError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("pid "), "{err}");
    drop(held);
    DataDir::lock(dir.path()).unwrap();
}

fn deadline() -> crate::store::Deadline {
    crate::store::Deadline::after(Duration::from_secs(5))
}

/// A task submitted to `e`'s embedded task store (journaled).
async fn submit_one(e: &Embedded) -> crate::domain::task::Task {
    use crate::domain::task::{QueueName, Task, TaskId};
    use crate::store::tasks::TaskBackend;
    let queue = QueueName::parse("research").unwrap();
    let task = Task {
        id: TaskId::generate(&queue),
        ..Task::sample(0, 0)
    };
    let tasks = e.tasks.as_ref().unwrap();
    tasks
        .submit(&task, Duration::ZERO, TaskLimits::default(), deadline())
        .await
        .unwrap();
    task
}
