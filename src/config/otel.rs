//! The standard OpenTelemetry variables that koo reads for trace export
//! (global flags: `serve`, `worker` and `scheduler` all export). The
//! exporter and batch processor also read their own `OTEL_EXPORTER_OTLP_*`
//! (headers, timeout, compression) and `OTEL_BSP_*` variables directly.

use clap::Args;

use super::ConfigError;
use crate::trace::settings::{Sampling, TraceSettings, parse_resource};

/// OpenTelemetry trace export (off unless an OTLP endpoint is set).
#[derive(Debug, Args, Default)]
pub struct OtelArgs {
    /// OTLP/gRPC collector endpoint (e.g. `http://127.0.0.1:4317`; plaintext
    /// only): set, koo exports traces.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "OTEL_EXPORTER_OTLP_ENDPOINT",
        global = true
    )]
    pub otlp_endpoint: Option<String>,
    /// The endpoint for traces alone (wins over OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        value_name = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        global = true
    )]
    pub otlp_traces_endpoint: Option<String>,
    /// OTLP transport: only `grpc` is supported.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        value_name = "OTEL_EXPORTER_OTLP_PROTOCOL",
        global = true
    )]
    pub otlp_protocol: Option<String>,
    /// `true` turns export off whatever the endpoint.
    #[arg(
        long,
        env = "OTEL_SDK_DISABLED",
        value_name = "OTEL_SDK_DISABLED",
        global = true
    )]
    pub otel_sdk_disabled: Option<String>,
    /// `service.name` of koo's spans [default: koo, or service.name of
    /// OTEL_RESOURCE_ATTRIBUTES].
    #[arg(
        long,
        env = "OTEL_SERVICE_NAME",
        value_name = "OTEL_SERVICE_NAME",
        global = true
    )]
    pub otel_service_name: Option<String>,
    /// Sampler: always_on, always_off, traceidratio, parentbased_always_on
    /// (the default), parentbased_always_off, parentbased_traceidratio.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        value_name = "OTEL_TRACES_SAMPLER",
        global = true
    )]
    pub otel_traces_sampler: Option<String>,
    /// The ratio of the *traceidratio samplers (0 to 1; default 1).
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER_ARG",
        value_name = "OTEL_TRACES_SAMPLER_ARG",
        global = true
    )]
    pub otel_traces_sampler_arg: Option<String>,
    /// Resource attributes: `key=value,...`, values percent-encoded.
    #[arg(
        long,
        env = "OTEL_RESOURCE_ATTRIBUTES",
        value_name = "OTEL_RESOURCE_ATTRIBUTES",
        global = true
    )]
    pub otel_resource_attributes: Option<String>,
}

impl OtelArgs {
    /// The checked settings.
    pub fn into_settings(self) -> Result<TraceSettings, ConfigError> {
        let invalid = |variable, reason: String| ConfigError { variable, reason };
        let disabled = match self.otel_sdk_disabled.as_deref().map(str::trim) {
            None | Some("") => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(v) => {
                return Err(invalid(
                    "OTEL_SDK_DISABLED",
                    format!("{v:?} is not true or false"),
                ));
            }
        };
        if let Some(p) = self.otlp_protocol.as_deref().map(str::trim)
            && !p.is_empty()
            && p != "grpc"
        {
            return Err(invalid(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                format!("{p:?} is not supported: koo exports over grpc"),
            ));
        }
        let named = [
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                self.otlp_traces_endpoint,
            ),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.otlp_endpoint),
        ]
        .into_iter()
        .filter_map(|(name, e)| Some((name, e?.trim().to_owned())))
        .find(|(_, e)| !e.is_empty());
        let (setting, endpoint) = match named {
            Some((name, e)) => (name, Some(e)),
            None => ("OTEL_EXPORTER_OTLP_ENDPOINT", None),
        };
        if let Some(e) = &endpoint {
            if e.starts_with("https://") {
                // the exporter is built without a TLS stack of its own
                return Err(invalid(
                    setting,
                    format!(
                        "{e:?}: TLS to the collector is not supported; export over http:// to an \
                         OpenTelemetry Collector beside koo, which forwards over TLS"
                    ),
                ));
            }
            if !e.starts_with("http://") {
                return Err(invalid(
                    setting,
                    format!("{e:?} is not an http:// URL (e.g. http://127.0.0.1:4317)"),
                ));
            }
        }
        let sampling = Sampling::parse(
            self.otel_traces_sampler.as_deref().unwrap_or(""),
            self.otel_traces_sampler_arg.as_deref(),
        )
        .map_err(|(variable, e)| invalid(variable, e))?;
        let mut resource = parse_resource(self.otel_resource_attributes.as_deref().unwrap_or(""))
            .map_err(|e| invalid("OTEL_RESOURCE_ATTRIBUTES", e))?;
        // OTEL_SERVICE_NAME wins over the attribute, which wins over "koo"
        let from_resource = resource
            .iter()
            .position(|(k, _)| k == "service.name")
            .map(|i| resource.remove(i).1);
        let service_name = self
            .otel_service_name
            .filter(|n| !n.trim().is_empty())
            .or(from_resource)
            .unwrap_or_else(|| "koo".to_owned());
        Ok(TraceSettings {
            endpoint: endpoint.filter(|_| !disabled),
            service_name,
            sampling,
            resource,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off by default; the traces endpoint wins; OTEL_SDK_DISABLED turns it
    /// off; service.name comes from the variable, then the attributes.
    #[test]
    fn settings() {
        let s = OtelArgs::default().into_settings().unwrap();
        assert_eq!(s, TraceSettings::default());
        let s = OtelArgs {
            otlp_endpoint: Some("http://a:4317".into()),
            otlp_traces_endpoint: Some("http://b:4317".into()),
            otel_resource_attributes: Some("service.name=api,env=prod".into()),
            ..OtelArgs::default()
        }
        .into_settings()
        .unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://b:4317"));
        assert_eq!(s.service_name, "api");
        assert_eq!(s.resource, vec![("env".to_owned(), "prod".to_owned())]);
        let s = OtelArgs {
            otlp_endpoint: Some("http://a:4317".into()),
            otel_sdk_disabled: Some("TRUE".into()),
            ..OtelArgs::default()
        }
        .into_settings()
        .unwrap();
        assert_eq!(s.endpoint, None);
    }

    /// Bad values name their variable.
    #[test]
    fn bad_values_name_the_variable() {
        let bad = |args: OtelArgs| args.into_settings().unwrap_err().variable;
        let e = bad(OtelArgs {
            otel_sdk_disabled: Some("yes".into()),
            ..OtelArgs::default()
        });
        assert_eq!(e, "OTEL_SDK_DISABLED");
        let e = bad(OtelArgs {
            otlp_protocol: Some("http/protobuf".into()),
            ..OtelArgs::default()
        });
        assert_eq!(e, "OTEL_EXPORTER_OTLP_PROTOCOL");
        let e = bad(OtelArgs {
            otlp_endpoint: Some("collector:4317".into()),
            ..OtelArgs::default()
        });
        assert_eq!(e, "OTEL_EXPORTER_OTLP_ENDPOINT");
        let e = bad(OtelArgs {
            otlp_traces_endpoint: Some("https://tempo:4317".into()),
            ..OtelArgs::default()
        });
        // the setting that holds the endpoint is the one named
        assert_eq!(e, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let e = bad(OtelArgs {
            otel_traces_sampler: Some("xray".into()),
            ..OtelArgs::default()
        });
        assert_eq!(e, "OTEL_TRACES_SAMPLER");
    }
}
