//! The caller's deadline, from the `grpc-timeout` header.

use std::time::Duration;

use tonic::metadata::MetadataMap;

use crate::store::Deadline;

/// The call's deadline: the client's `grpc-timeout` when it set one,
/// otherwise `default`.
///
/// A client's deadline is shortened ([`margin`]), so that koo answers
/// DEADLINE_EXCEEDED or UNAVAILABLE with a reason just before the client's
/// own timer fires, and before tonic's: tonic's server enforces
/// `grpc-timeout` outside koo's layers, from the moment the request
/// arrived, and answers a bare `CANCELLED: Timeout expired` when it wins.
pub fn from_metadata(metadata: &MetadataMap, default: Duration) -> Deadline {
    let timeout = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|t| t - margin(t))
        .unwrap_or(default);
    Deadline::after(timeout)
}

/// What koo keeps of a client's deadline `t` to answer in: a tenth, at
/// least 1 ms (half of a deadline under 2 ms: tonic's timer started tens of
/// µs before koo's, a tenth of 2 ms lost that race about once in 300
/// calls), at most 50 ms.
fn margin(t: Duration) -> Duration {
    let floor = (t / 2).min(Duration::from_millis(1));
    (t / 10).max(floor).min(Duration::from_millis(50))
}

/// Parses the gRPC wire format: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unit parses; malformed values are ignored.
    #[test]
    fn parses_wire_format() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[test]
    fn the_margin_is_a_tenth_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(margin(ms(2)), ms(1));
        assert_eq!(
            margin(Duration::from_micros(600)),
            Duration::from_micros(300)
        );
        assert_eq!(margin(ms(100)), ms(10));
        assert_eq!(margin(ms(5000)), ms(50));
    }
}
