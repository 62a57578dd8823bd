//! What the standard `OTEL_*` variables select (parsed by
//! `crate::config::OtelArgs`).

/// Trace export's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The OTLP/gRPC endpoint (`None`: no export).
    pub endpoint: Option<String>,
    /// `service.name` of koo's spans.
    pub service_name: String,
    /// Which traces are recorded.
    pub sampling: Sampling,
    /// `OTEL_RESOURCE_ATTRIBUTES`, decoded.
    pub resource: Vec<(String, String)>,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            endpoint: None,
            service_name: "koo".to_owned(),
            sampling: Sampling::default(),
            resource: Vec::new(),
        }
    }
}

/// `OTEL_TRACES_SAMPLER` (and its argument).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// `parentbased_*`: a call with a parent follows the parent's decision.
    pub parent_based: bool,
    /// The decision for a root span.
    pub root: Root,
}

impl Default for Sampling {
    /// The specification's default: `parentbased_always_on`.
    fn default() -> Self {
        Self {
            parent_based: true,
            root: Root::AlwaysOn,
        }
    }
}

/// A root span's sampling decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// This fraction of trace ids (0 to 1).
    Ratio(f64),
}

impl Sampling {
    /// Parses `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (the
    /// ratio of `*traceidratio`, 1 when absent). An error names the
    /// variable that is wrong, and says what is wrong with it.
    pub fn parse(sampler: &str, arg: Option<&str>) -> Result<Self, (&'static str, String)> {
        let ratio = || -> Result<f64, (&'static str, String)> {
            let Some(arg) = arg.map(str::trim).filter(|a| !a.is_empty()) else {
                return Ok(1.0);
            };
            match arg.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err((
                    "OTEL_TRACES_SAMPLER_ARG",
                    format!("{arg:?} is not a ratio between 0 and 1"),
                )),
            }
        };
        let (parent_based, root) = match sampler.trim().to_ascii_lowercase().as_str() {
            "always_on" => (false, Root::AlwaysOn),
            "always_off" => (false, Root::AlwaysOff),
            "traceidratio" => (false, Root::Ratio(ratio()?)),
            "" | "parentbased_always_on" => (true, Root::AlwaysOn),
            "parentbased_always_off" => (true, Root::AlwaysOff),
            "parentbased_traceidratio" => (true, Root::Ratio(ratio()?)),
            other => {
                return Err((
                    "OTEL_TRACES_SAMPLER",
                    format!(
                        "{other:?} is not supported (always_on, always_off, traceidratio, \
                         parentbased_always_on, parentbased_always_off, parentbased_traceidratio)"
                    ),
                ));
            }
        };
        Ok(Self { parent_based, root })
    }
}

/// Decodes `OTEL_RESOURCE_ATTRIBUTES`: `key=value` pairs separated by
/// commas, values percent-encoded (W3C Baggage's format).
pub fn parse_resource(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("{pair:?} is not key=value"));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{pair:?} has no key"));
        }
        let value = crate::percent::decode(value.trim())
            .ok_or_else(|| format!("{pair:?} is not percent-encoded"))?;
        out.push((key.to_owned(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sampler of the specification parses; others are refused by name.
    #[test]
    fn samplers() {
        assert_eq!(Sampling::parse("", None).unwrap(), Sampling::default());
        let s = Sampling::parse("parentbased_traceidratio", Some("0.25")).unwrap();
        assert_eq!((s.parent_based, s.root), (true, Root::Ratio(0.25)));
        let s = Sampling::parse("always_off", None).unwrap();
        assert_eq!((s.parent_based, s.root), (false, Root::AlwaysOff));
        let (var, e) = Sampling::parse("traceidratio", Some("2")).unwrap_err();
        assert_eq!(var, "OTEL_TRACES_SAMPLER_ARG", "{e}");
        assert!(e.starts_with("\"2\" is not a ratio"), "{e}");
        let (var, e) = Sampling::parse("jaeger_remote", None).unwrap_err();
        assert_eq!(var, "OTEL_TRACES_SAMPLER", "{e}");
        assert!(!e.contains("OTEL_"), "named once, by the caller: {e}");
    }

    /// Resource attributes are split and percent-decoded.
    #[test]
    fn resource_attributes() {
        let r = parse_resource("deployment.environment=prod, team=a%2Cb").unwrap();
        assert_eq!(
            r,
            vec![
                ("deployment.environment".into(), "prod".into()),
                ("team".into(), "a,b".into())
            ]
        );
        assert!(parse_resource("novalue").unwrap_err().contains("key=value"));
        assert!(parse_resource("k=%zz").is_err());
    }
}
