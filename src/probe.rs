//! TEMPORARY timing probe (not to land).
use std::io::Write;
use std::sync::Mutex;
static OUT: Mutex<Option<std::fs::File>> = Mutex::new(None);
pub fn t(label: &str) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
    let mut g = OUT.lock().unwrap();
    let f = g.get_or_insert_with(|| std::fs::OpenOptions::new().create(true).append(true).open("/tmp/probe.log").unwrap());
    let _ = writeln!(f, "{now} {label}");
}
