//! Redis's memory figures, from `INFO memory` (of every master on a
//! Cluster).

use super::call::has_code;
use super::{RedisStore, conn};
use crate::store::{Deadline, MemoryReport, Result};

impl RedisStore {
    /// Redis's memory figures from `INFO memory`. A user whose ACL does not
    /// grant `INFO` (it is optional, see [`super::acl`]) gets a report that says
    /// the figures are unknown instead of an error, so that health, metrics
    /// and maintenance degrade rather than fail.
    ///
    /// On a Cluster, the masters' figures summed (see [`sum_reports`]).
    pub(in crate::store) async fn memory(&self, deadline: Deadline) -> Result<MemoryReport> {
        let infos: Option<Vec<String>> = self
            .run(deadline, |mut c| async move {
                let mut cmd = redis::cmd("INFO");
                cmd.arg("memory");
                let mut infos = Vec::new();
                // `[""]` (no round trip) on one server
                for node in conn::masters(&mut c).await? {
                    let info = if node.is_empty() {
                        cmd.query_async(&mut c).await
                    } else {
                        c.query_node(&node, &cmd).await
                    };
                    match info {
                        Err(e) if has_code(&e, "NOPERM") => return Ok(None),
                        other => infos.push(other?),
                    }
                }
                Ok(Some(infos))
            })
            .await?;
        Ok(match infos {
            Some(infos) => sum_reports(infos.iter().map(|i| parse_memory_info(i))),
            None => MemoryReport::unknown("INFO not permitted for koo's Redis user"),
        })
    }
}

/// One report of several nodes' (a Cluster's masters, which hold all the
/// data): bytes used, peaks and limits summed (no limit if any node has
/// none), fragmentation weighted by the bytes used, and the policy if they
/// agree (else `mixed (a, b)`, which the policy checks then flag). One
/// node's report is itself.
fn sum_reports(reports: impl Iterator<Item = MemoryReport>) -> MemoryReport {
    let mut reports = reports.peekable();
    let Some(mut total) = reports.next() else {
        return MemoryReport::unknown("no Redis node answered INFO");
    };
    if reports.peek().is_none() {
        return total;
    }
    let mut weighted = total.fragmentation * total.used as f64;
    let mut policies = vec![std::mem::take(&mut total.policy)];
    for r in reports {
        total.max = if total.max == 0 || r.max == 0 {
            0
        } else {
            total.max + r.max
        };
        total.used += r.used;
        total.peak += r.peak;
        weighted += r.fragmentation * r.used as f64;
        if !policies.contains(&r.policy) {
            policies.push(r.policy);
        }
    }
    total.fragmentation = if total.used == 0 {
        0.0
    } else {
        weighted / total.used as f64
    };
    total.policy = match policies.len() {
        1 => policies.remove(0),
        _ => format!("mixed ({})", policies.join(", ")),
    };
    total
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

    /// A Cluster's masters add up; one unlimited master makes no limit.
    #[test]
    fn reports_of_masters_add_up() {
        let node = |used, max, policy: &str| MemoryReport {
            used,
            peak: used * 2,
            fragmentation: 1.0 + used as f64 / 1000.0,
            max,
            policy: policy.into(),
            unavailable: None,
        };
        let one = sum_reports([node(100, 10, "noeviction")].into_iter());
        assert_eq!(
            (one.used, one.max, one.policy.as_str()),
            (100, 10, "noeviction")
        );
        let two = sum_reports([node(100, 10, "x"), node(300, 20, "x")].into_iter());
        assert_eq!((two.used, two.peak, two.max), (400, 800, 30));
        assert!((two.fragmentation - (1.1 * 100.0 + 1.3 * 300.0) / 400.0).abs() < 1e-9);
        assert_eq!(two.policy, "x");
        let mixed = sum_reports([node(1, 0, "x"), node(1, 5, "y")].into_iter());
        assert_eq!((mixed.max, mixed.policy.as_str()), (0, "mixed (x, y)"));
    }
}
