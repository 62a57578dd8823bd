//! Tests of `persist::journal`.
use super::*;

fn record(i: i64) -> Record {
    Record::Retry {
        now: i,
        id: format!("t{i}"),
    }
}

/// Records are written in order, in the generation current when they
/// were appended; rotation starts a new file and `remove_before`
/// deletes the older ones.
#[tokio::test]
async fn records_land_in_their_generation_in_order() {
    let dir = tempfile::tempdir().unwrap();
    for fsync in [Fsync::Always, Fsync::EverySec, Fsync::No] {
        let j = FileJournal::start(dir.path(), 7, fsync).unwrap();
        let a = j.append(record(1));
        let b = j.append(record(2));
        j.kept(a, b).await.unwrap();
        assert!(a < b);
        assert_eq!(j.rotate(), 8);
        let c = j.append(record(3));
        j.kept(c, c).await.unwrap();
        let found = files(dir.path()).unwrap();
        assert_eq!(
            found.iter().map(|(g, _)| *g).collect::<Vec<_>>(),
            [7, 8],
            "{fsync}"
        );
        assert_eq!(read(&found[0].1, false).unwrap(), [record(1), record(2)]);
        assert_eq!(read(&found[1].1, true).unwrap(), [record(3)]);
        remove_before(dir.path(), 8);
        assert_eq!(files(dir.path()).unwrap().len(), 1);
        j.close();
        remove_before(dir.path(), 9);
    }
}

/// A rotation with nothing appended since the last one keeps the
/// current (empty) file: failing saves leave no trail of files.
#[tokio::test]
async fn rotating_an_empty_file_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let j = FileJournal::start(dir.path(), 3, Fsync::No).unwrap();
    assert_eq!(j.rotate(), 3);
    assert_eq!(j.rotate(), 3);
    let seq = j.append(record(1));
    assert_eq!(j.rotate(), 4);
    assert_eq!(j.rotate(), 4);
    j.kept(seq, seq).await.unwrap();
    let c = j.append(record(2));
    j.kept(c, c).await.unwrap();
    let found = files(dir.path()).unwrap();
    assert_eq!(found.iter().map(|(g, _)| *g).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(read(&found[1].1, true).unwrap(), [record(2)]);
    j.close();
}

/// A last line cut short is dropped; a bad line before good ones is
/// corruption naming the file and line.
#[test]
fn torn_tails_are_dropped_and_bad_lines_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file_name(1));
    let good = serde_json::to_string(&record(1)).unwrap();
    std::fs::write(&path, format!("{good}\n{{\"op\":\"ret")).unwrap();
    assert_eq!(read(&path, true).unwrap(), [record(1)]);
    // in any file: an older one may end torn when a crash came before
    // the start that followed could save
    assert_eq!(read(&path, false).unwrap(), [record(1)]);
    // a whole last line that does not parse: torn only in the newest
    std::fs::write(&path, format!("{good}\n{{\"op\":\"ret\n")).unwrap();
    assert_eq!(read(&path, true).unwrap(), [record(1)]);
    let err = read(&path, false).unwrap_err();
    assert!(err.to_string().contains("journal line 2"), "{err}");
    // a whole line that parses but lost its end is not taken either
    std::fs::write(&path, format!("{good}\n{good}")).unwrap();
    assert_eq!(read(&path, true).unwrap(), [record(1)]);
    // a record this koo does not know (a newer koo's) is not torn
    std::fs::write(&path, format!("{good}\n{{\"op\":\"frobnicate\"}}\n")).unwrap();
    let err = read(&path, true).unwrap_err();
    assert!(err.to_string().contains("journal line 2"), "{err}");
    std::fs::write(&path, format!("garbage\n{good}\n")).unwrap();
    let err = read(&path, true).unwrap_err();
    assert!(err.to_string().contains("journal line 1"), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

/// A file that cannot be written fails its callers' waits with
/// UNAVAILABLE, naming the cause, and later records written elsewhere
/// succeed again.
#[tokio::test]
async fn unwritable_journal_fails_its_callers() {
    let dir = tempfile::tempdir().unwrap();
    let j = FileJournal::start(dir.path(), 1, Fsync::Always).unwrap();
    // rotate into a directory that is gone: the file cannot be opened
    let gone = tempfile::tempdir().unwrap();
    let j2 = FileJournal::start(gone.path(), 1, Fsync::Always).unwrap();
    let first = j2.append(record(0));
    j2.kept(first, first).await.unwrap();
    drop(gone);
    j2.rotate();
    let seq = j2.append(record(1));
    let err = j2.kept(seq, seq).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("journal"), "{err}");
    let seq = j.append(record(2));
    j.kept(seq, seq).await.unwrap();
    // closed: what is appended afterwards is refused, not answered OK
    j.close();
    let late = j.append(record(3));
    let err = j.kept(late, late).await.unwrap_err();
    assert!(err.to_string().contains("stopping"), "{err}");
}

#[test]
fn fsync_parses_and_names_its_choices() {
    assert_eq!("Always".parse::<Fsync>(), Ok(Fsync::Always));
    assert_eq!("everysec".parse::<Fsync>(), Ok(Fsync::EverySec));
    assert_eq!(" no ".parse::<Fsync>(), Ok(Fsync::No));
    let err = "sometimes".parse::<Fsync>().unwrap_err();
    assert!(err.contains("always, everysec or no"), "{err}");
    assert!(err.contains("sometimes"), "{err}");
}
