//! The `koo` binary: parses the command line, sets up logging, and runs a
//! subcommand until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use koo::cli::finish;
use koo::config::{Cli, Command, HealthArgs};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// jemalloc, not glibc's malloc: glibc keeps what thousands of closed
/// streams freed (koo's RSS stayed at its peak), and mimalloc kept a third of
/// it; jemalloc's background thread gives unused pages back to the OS within
/// seconds, even while koo's own threads are idle (`cargo test --test it
/// streams::memory_returns_after_streams_close` measures it from /proc). The
/// `system-allocator` feature builds with glibc's, for comparison.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at start-up: a background thread purges pages
/// unused for 5 s (`_RJEM_MALLOC_CONF` in the environment overrides them).
#[cfg(not(feature = "system-allocator"))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    // One crypto provider for the binary (tonic's TLS, the listener's, redis'
    // rustls), chosen before anything builds a TLS config.
    koo::transport::tls::install_default_provider();
    let mut cli = Cli::parse();
    if let Err(e) = koo::telemetry::init(cli.log_format, &cli.log) {
        eprintln!("koo: {e:#}");
        return ExitCode::from(2);
    }
    let traces = match std::mem::take(&mut cli.otel).into_settings() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("koo: {e}");
            return ExitCode::from(2);
        }
    };
    // the long-running commands also log a fatal error (for log
    // collectors); a client command only prints it
    let daemon = matches!(
        cli.command,
        Command::Serve(_) | Command::Worker(_) | Command::Scheduler(_)
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("koo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // the probes and key tool export nothing
        let guard = if daemon {
            koo::trace::install(&traces)?
        } else {
            koo::trace::TraceGuard::default()
        };
        let result = match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Worker(args) => worker(*args).await,
            Command::Scheduler(args) => scheduler(*args).await,
            Command::Health(args) => health(args).await,
            Command::Auth(koo::config::AuthCommand::NewKey(args)) => new_key(&args),
            // The client commands print their own errors and choose their
            // exit codes (koo::cli::ExitStatus).
            Command::Cache(args) => Ok(finish(koo::cli::cache::run(*args).await)),
            Command::Task(args) => Ok(finish(koo::cli::task::run(*args).await)),
            Command::Cron(args) => Ok(finish(koo::cli::cron::run(*args).await)),
            Command::Ps(args) => Ok(finish(koo::cli::ps::run(*args).await)),
            Command::Queue(args) => Ok(finish(koo::cli::queue::run(*args).await)),
            Command::Limit(args) => Ok(finish(koo::cli::limit::run(*args).await)),
            Command::Top(args) => Ok(finish(koo::cli::top::run(*args).await)),
        };
        guard.shutdown().await;
        result
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // each cause once: many of koo's errors quote their source
            let message = koo::cli::connect::error_chain(e.as_ref());
            if daemon {
                tracing::error!("{message}");
            }
            eprintln!("koo: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: koo::config::ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = args.into_settings()?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("KOO_LISTEN: cannot listen on {}", settings.listen))?;
    koo::server::run(listener, settings, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `koo worker`: worker slots and lease recovery, no gRPC, until a signal.
async fn worker(args: koo::config::WorkerArgs) -> anyhow::Result<ExitCode> {
    let settings = args
        .into_settings()?
        .context("koo worker needs Redis: set REDIS_URL (or TASK_BROKER_URL)")?;
    koo::server::run_worker(settings, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `koo scheduler`: fires the periodic schedules (no gRPC, no workers),
/// until a signal. Any number may run: each tick submits one task.
async fn scheduler(args: koo::config::SchedulerArgs) -> anyhow::Result<ExitCode> {
    let settings = args
        .into_settings()?
        .context("koo scheduler needs Redis: set REDIS_URL (or TASK_BROKER_URL)")?;
    koo::server::run_scheduler(settings, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops koo");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => tracing::info!("received SIGINT"),
            _ = term.recv() => tracing::info!("received SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// `koo auth new-key`: a fresh key and the entry to paste into the keys
/// file (2 when the entry would not be valid).
fn new_key(args: &koo::config::NewKeyArgs) -> anyhow::Result<ExitCode> {
    match koo::auth::new_key::new_key(&args.request()) {
        Ok(made) => {
            println!(
                "# The key: give it to the client (authorization: Bearer <key>); koo keeps only its digest."
            );
            println!("{}", made.key);
            println!();
            println!("# The entry to add to the keys file (KOO_AUTH_FILE):");
            print!("{}", made.entry);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("koo: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

/// `koo health`'s TLS: the CA to trust, and a client certificate for mTLS.
fn health_tls(args: &HealthArgs) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
    };
    let Some(ca) = &args.tls_ca else {
        anyhow::ensure!(
            args.tls_cert.is_none() && args.tls_server_name.is_none(),
            "--tls-cert and --tls-server-name need --tls-ca (the CA of the server's certificate)"
        );
        return Ok(None);
    };
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        tls = tls.identity(Identity::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
        ));
    }
    if let Some(name) = &args.tls_server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(Some(tls))
}

/// `koo health`: exit 0 when the server reports SERVING.
async fn health(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let mut addr = args.addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let scheme = if args.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    let tls = health_tls(&args)?;
    let security = koo::cli::connect::Security {
        tls: tls.is_some(),
        client_cert: args.tls_cert.is_some(),
        cert_flags: "--tls-cert and --tls-key (KOO_HEALTH_TLS_CERT, KOO_HEALTH_TLS_KEY)",
        tls_flag: "--tls-ca (KOO_HEALTH_TLS_CA)",
    };
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        let chain = koo::cli::connect::error_chain(&e);
        anyhow::anyhow!(
            "cannot reach koo at {addr}: {chain}{}",
            security.hint(&chain)
        )
    })?;
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: args.service.clone(),
    });
    if let Some(key) = &args.key {
        let bearer = format!("Bearer {key}")
            .parse()
            .context("KOO_API_KEY: not a valid header value")?;
        request.metadata_mut().insert("authorization", bearer);
    }
    let reply = HealthClient::new(channel)
        .check(request)
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "health check of {:?} failed: {}: {}",
                args.service,
                koo::cli::connect::code_name(s.code()),
                security.explain(&s)
            )
        })?;
    let status =
        ServingStatus::try_from(reply.into_inner().status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
