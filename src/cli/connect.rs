//! Where koo is and how to reach it: the connection flags every client
//! command shares (named as the Python SDK's settings), the channel, and
//! the metadata each call carries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::CliError;

/// The default `--target`, as the Python SDK's.
pub const DEFAULT_TARGET: &str = "127.0.0.1:50051";

/// How to reach koo (every client command takes these, before or after its
/// subcommand).
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// koo's gRPC address: `host:port`, `http://host:port`, or
    /// `https://host:port` for TLS.
    #[arg(long, env = "KOO_TARGET", default_value = DEFAULT_TARGET, global = true)]
    pub target: String,
    /// Use TLS (the system's roots unless --tls-ca) even without `https://`
    /// (`--tls`, `--tls=off`; KOO_CLIENT_TLS: true/false, on/off, yes/no, 1/0).
    #[arg(long, env = "KOO_CLIENT_TLS", global = true, action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub tls: bool,
    /// API key, sent as `authorization: Bearer <key>`.
    #[arg(long, env = "KOO_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// PEM CA that signed koo's certificate (implies TLS).
    #[arg(long, env = "KOO_CLIENT_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a koo that requires one (mTLS; with --tls-key).
    #[arg(long, env = "KOO_CLIENT_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KOO_CLIENT_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// Name to verify koo's certificate against (default: the target's host).
    #[arg(long, env = "KOO_CLIENT_TLS_SERVER_NAME", global = true)]
    pub tls_server_name: Option<String>,
    /// How long to wait for the connection and for each answer (for a
    /// stream, `watch` or `top`, its opening: it then lasts as it runs).
    #[arg(
        long,
        env = "KOO_CLIENT_TIMEOUT",
        default_value = "10s",
        value_parser = parse_timeout,
        global = true
    )]
    pub timeout: Duration,
    /// Print the replies as JSON (the proto3 JSON mapping; one object per
    /// line for streams) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A humantime duration (`60s`, `1h 30m`) or plain seconds (`30`, `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    match s.parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{s:?} is not a non-negative number of seconds")),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 60s, 10m, 1h 30m")),
    }
}

/// `--timeout`: a duration above zero. A zero deadline would fail every
/// call as `CANCELLED` before it is sent, which reads as koo's doing.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!(
            "{:?} is zero; a timeout must be above zero (e.g. 500ms, 10s)",
            s.trim()
        )),
        d => Ok(d),
    }
}

/// An open channel to koo and what each call carries.
#[derive(Debug, Clone)]
pub struct Conn {
    channel: Channel,
    bearer: Option<AsciiMetadataValue>,
    timeout: Duration,
    target: String,
    /// How the connection was made, to explain one koo closes.
    security: Security,
    /// `--json`.
    pub json: bool,
}

impl Conn {
    /// Connects to `args.target` (an unreachable koo is an error naming it).
    pub async fn open(args: &ConnectArgs) -> Result<Conn, CliError> {
        let (uri, tls) = endpoint_uri(args)?;
        let security = Security {
            tls: tls.is_some(),
            client_cert: args.tls_cert.is_some(),
            cert_flags: CERT_FLAGS,
            tls_flag: TLS_FLAGS,
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| usage(format!("--target {:?}: {e}", args.target)))?
            .connect_timeout(args.timeout)
            // bounds every call until koo answers, a stream's opening
            // included (a listener that accepts and never speaks HTTP/2 would
            // hold `watch` for ever); a stream's messages are not bounded
            .timeout(args.timeout);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| usage(format!("--tls-ca: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            let mut reason = error_chain(&e);
            reason.push_str(&security.hint(&reason));
            CliError::Unreachable {
                target: args.target.clone(),
                reason,
            }
        })?;
        let bearer = match &args.api_key {
            Some(key) => Some(
                MetadataValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| usage("--api-key (KOO_API_KEY): not a valid header value"))?,
            ),
            None => None,
        };
        Ok(Conn {
            channel,
            bearer,
            timeout: args.timeout,
            target: args.target.clone(),
            json: args.json,
            security,
        })
    }

    /// The channel, for a generated client.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// A unary call's request: the key, and `--timeout` as its deadline.
    pub fn unary<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = self.stream(message);
        request.set_timeout(self.timeout);
        request
    }

    /// A streaming call's request: the key, no deadline.
    pub fn stream<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        request
    }

    /// A failed call as the error the command ends with.
    pub fn failed(&self, status: tonic::Status) -> CliError {
        // tonic's own deadline reads "CANCELLED: Timeout expired"
        if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" {
            return CliError::Rpc {
                target: self.target.clone(),
                code: code_name(tonic::Code::DeadlineExceeded),
                message: format!("no answer within --timeout {:?}", self.timeout),
            };
        }
        CliError::Rpc {
            target: self.target.clone(),
            code: code_name(status.code()),
            message: self.security.explain(&status),
        }
    }
}

fn usage(message: impl Into<String>) -> CliError {
    CliError::Usage(message.into())
}

/// The URI to connect to and the TLS settings, from the target and flags.
fn endpoint_uri(args: &ConnectArgs) -> Result<(String, Option<ClientTlsConfig>), CliError> {
    let target = args.target.trim();
    let (explicit_tls, rest) = if let Some(rest) = target.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = target.strip_prefix("http://") {
        (false, rest)
    } else if target.contains("://") {
        return Err(usage(format!(
            "--target {target:?}: use host:port, http://host:port or https://host:port"
        )));
    } else {
        (false, target)
    };
    if rest.is_empty() {
        return Err(usage("--target (KOO_TARGET): empty"));
    }
    let tls = explicit_tls || args.tls || args.tls_ca.is_some() || args.tls_cert.is_some();
    if target.starts_with("http://") && tls {
        return Err(usage(format!(
            "--target {target:?} is plaintext but TLS flags were given; use https://"
        )));
    }
    if args.tls_cert.is_some() != args.tls_key.is_some() {
        return Err(usage("--tls-cert and --tls-key go together (mTLS)"));
    }
    if !tls {
        return Ok((format!("http://{rest}"), None));
    }
    let read = |flag: &str, path: &Path| {
        std::fs::read(path)
            .map_err(|e| usage(format!("{flag}: cannot read {}: {e}", path.display())))
    };
    let mut config = ClientTlsConfig::new();
    config = match &args.tls_ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?)),
        None => config.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config = config.identity(Identity::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
        ));
    }
    if let Some(name) = &args.tls_server_name {
        config = config.domain_name(name.clone());
    }
    Ok((format!("https://{rest}"), Some(config)))
}

/// The client commands' settings for a client certificate.
const CERT_FLAGS: &str = "--tls-cert and --tls-key (KOO_CLIENT_TLS_CERT, KOO_CLIENT_TLS_KEY)";
/// The client commands' ways to ask for TLS.
const TLS_FLAGS: &str = "an https:// target or --tls-ca (KOO_CLIENT_TLS_CA)";

/// How a client reached koo: what a connection koo closed at once most
/// likely means depends on it (a TLS koo closes a plaintext connection; an
/// mTLS koo closes one without a client certificate, under TLS 1.3 often
/// after the handshake, so the client sees no alert, only the close).
#[derive(Debug, Clone, Copy)]
pub struct Security {
    /// The connection used TLS.
    pub tls: bool,
    /// A client certificate was given.
    pub client_cert: bool,
    /// The settings that give a client certificate, for the hint.
    pub cert_flags: &'static str,
    /// The setting that asks for TLS, for the hint.
    pub tls_flag: &'static str,
}

impl Security {
    /// A failed call's text, with the [`Self::hint`] when the failure is
    /// this side's connection's: a message koo sent (a Redis "connection
    /// reset" it passes on) is koo's to explain.
    pub fn explain(&self, status: &tonic::Status) -> String {
        let mut text = status_text(status);
        if std::error::Error::source(status).is_some() {
            text.push_str(&self.hint(&text));
        }
        text
    }

    /// A hint to add to a failure's `text` when it says the connection was
    /// closed or reset (empty otherwise), naming the settings to try.
    pub fn hint(&self, text: &str) -> String {
        let (cert_flags, tls_flag) = (self.cert_flags, self.tls_flag);
        let text = text.to_ascii_lowercase();
        // a TLS client reading a plaintext server's HTTP/2 bytes as a TLS
        // record (rustls: "received corrupt message of type InvalidContentType")
        if self.tls && (text.contains("invalidcontenttype") || text.contains("corrupt message")) {
            return format!(
                " (koo answered in plaintext: drop {tls_flag} and https://, or give koo KOO_TLS_CERT)"
            );
        }
        // hyper's words for a connection the server closed: at once, in
        // the middle of a call, or before the first request could go out
        let closed = [
            "connection closed",
            "connection reset",
            "broken pipe",
            "connection was not ready",
        ]
            .iter()
            .any(|c| text.contains(c))
            // a plaintext client reading a TLS alert as an HTTP/2 frame
            || (!self.tls && text.contains("frame with invalid size"));
        match (closed, self.tls, self.client_cert) {
            (false, ..) | (true, true, true) => String::new(),
            (true, true, false) => format!(
                " (koo closed the connection: if it requires client certificates \
                 (KOO_TLS_CLIENT_CA), give {cert_flags})"
            ),
            (true, false, _) => {
                format!(" (koo closed the connection: if it serves TLS, use {tls_flag})")
            }
        }
    }
}

/// A status's message, and for one made on this side (the connection
/// failed: a TLS alert, a reset), which says only "transport error", its
/// source's chain, which says why.
pub fn status_text(status: &tonic::Status) -> String {
    let said = status.message();
    match std::error::Error::source(status) {
        Some(source) => {
            let why = error_chain(source);
            if said.is_empty() || why.contains(said) {
                why
            } else {
                format!("{said}: {why}")
            }
        }
        None => said.to_owned(),
    }
}

/// An error and its sources on one line (tonic's top-level transport error
/// says only "transport error").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // hyper and tonic wrap errors in ones that repeat their message
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// The canonical name of a gRPC code (`NOT_FOUND`), as in the gRPC docs
/// and the other SDKs' messages.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_closed_connection_is_explained_by_how_it_was_made() {
        let closed = "transport error: connection closed";
        let hint = |tls, client_cert, text| {
            Security {
                tls,
                client_cert,
                cert_flags: "CERT",
                tls_flag: "TLS",
            }
            .hint(text)
        };
        assert!(hint(true, false, closed).contains("give CERT"));
        assert!(hint(false, false, closed).contains("use TLS"));
        assert!(hint(false, false, "Broken pipe").contains("use TLS"));
        assert_eq!(hint(true, true, closed), "");
        let plain = "received corrupt message of type InvalidContentType";
        assert!(hint(true, false, plain).contains("answered in plaintext"));
        assert_eq!(hint(false, false, plain), "");
        assert_eq!(hint(true, false, "deadline has elapsed"), "");
    }

    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        c: ConnectArgs,
    }

    fn args(line: &[&str]) -> ConnectArgs {
        Wrap::try_parse_from(std::iter::once("koo").chain(line.iter().copied()))
            .unwrap()
            .c
    }

    /// Plain targets get http://, https:// and --tls mean TLS, and a
    /// plaintext URI with TLS flags is refused.
    #[test]
    fn targets() {
        let (uri, tls) = endpoint_uri(&args(&["--target", "localhost:1"])).unwrap();
        assert_eq!((uri.as_str(), tls.is_some()), ("http://localhost:1", false));
        let (uri, tls) = endpoint_uri(&args(&["--target", "https://h:2"])).unwrap();
        assert_eq!((uri.as_str(), tls.is_some()), ("https://h:2", true));
        let (uri, tls) = endpoint_uri(&args(&["--target", "h:3", "--tls"])).unwrap();
        assert_eq!((uri.as_str(), tls.is_some()), ("https://h:3", true));
        assert!(endpoint_uri(&args(&["--target", "http://h:4", "--tls"])).is_err());
        assert!(endpoint_uri(&args(&["--target", "ftp://h:4"])).is_err());
        // a value as the other boolean settings take one (KOO_CLIENT_TLS=off)
        for (flag, tls) in [
            ("--tls=off", false),
            ("--tls=0", false),
            ("--tls=yes", true),
        ] {
            let (_, got) = endpoint_uri(&args(&["--target", "h:5", flag])).unwrap();
            assert_eq!(got.is_some(), tls, "{flag}");
        }
        let bad = Wrap::try_parse_from(["koo", "--tls=maybe"]).err().unwrap();
        assert!(bad.to_string().contains("maybe"), "{bad}");
    }

    /// With no flags, the SDK's default target (unless KOO_TARGET is set
    /// where the tests run), plaintext, 10 s.
    #[test]
    fn defaults_parse() {
        let a = args(&[]);
        let target = std::env::var("KOO_TARGET").unwrap_or_else(|_| DEFAULT_TARGET.to_owned());
        assert_eq!(a.target, target);
        if std::env::var_os("KOO_CLIENT_TIMEOUT").is_none() {
            assert_eq!(a.timeout, Duration::from_secs(10));
        }
        let (uri, _) = endpoint_uri(&args(&["--target", DEFAULT_TARGET])).unwrap();
        assert_eq!(uri, "http://127.0.0.1:50051");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_timeout("0s").unwrap_err().contains("above zero"));
        assert!(parse_timeout("0").is_err());
        assert_eq!(parse_timeout("1ms").unwrap(), Duration::from_millis(1));
    }
}
