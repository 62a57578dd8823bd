//! Redis's memory figures, from `INFO memory`.

use super::RedisStore;
use super::call::has_code;
use crate::store::{Deadline, MemoryReport, Result};

impl RedisStore {
    /// Redis's memory figures from `INFO memory`. A user whose ACL does not
    /// grant `INFO` (it is optional, see [`super::acl`]) gets a report that says
    /// the figures are unknown instead of an error, so that health, metrics
    /// and maintenance degrade rather than fail.
    pub(in crate::store) async fn memory(&self, deadline: Deadline) -> Result<MemoryReport> {
        let info: Option<String> = self
            .run(deadline, |mut c| async move {
                let mut cmd = redis::cmd("INFO");
                cmd.arg("memory");
                match cmd.query_async(&mut c).await {
                    Err(e) if has_code(&e, "NOPERM") => Ok(None),
                    other => other.map(Some),
                }
            })
            .await?;
        Ok(match info {
            Some(info) => parse_memory_info(&info),
            None => MemoryReport::unknown("INFO not permitted for koo's Redis user"),
        })
    }
}

fn parse_memory_info(info: &str) -> MemoryReport {
    let mut report = MemoryReport::default();
    for line in info.lines() {
        let Some((name, value)) = line.trim().split_once(':') else {
            continue;
        };
        match name {
            "used_memory" => report.used = value.parse().unwrap_or(0),
            "used_memory_peak" => report.peak = value.parse().unwrap_or(0),
            "mem_fragmentation_ratio" => report.fragmentation = value.parse().unwrap_or(0.0),
            "maxmemory" => report.max = value.parse().unwrap_or(0),
            "maxmemory_policy" => report.policy = value.to_owned(),
            _ => {}
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// INFO memory is parsed field by field, unknown lines ignored.
    #[test]
    fn parses_info_memory() {
        let info = "# Memory\r\nused_memory:1024\r\nused_memory_peak:2048\r\nmem_fragmentation_ratio:1.50\r\nmaxmemory:0\r\nmaxmemory_policy:allkeys-lru\r\nother:x\r\n";
        let r = parse_memory_info(info);
        assert_eq!(r.used, 1024);
        assert_eq!(r.peak, 2048);
        assert!((r.fragmentation - 1.5).abs() < 1e-9);
        assert_eq!(r.max, 0);
        assert_eq!(r.policy, "allkeys-lru");
    }
}
