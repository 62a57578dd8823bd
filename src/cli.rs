//! `koo cache|task|cron|ps|top`: the command-line client of a running koo.
//!
//! Every command opens one gRPC channel to `--target` (as the Python SDK:
//! `KOO_TARGET`, `KOO_API_KEY`), makes its calls through the generated
//! clients of [`crate::pb`] and prints a table, or with `--json` the proto3
//! JSON mapping of the replies. The exit code says how it went
//! ([`ExitStatus`]), so scripts need not parse messages.
//!
//! Named so they cannot be confused with the daemons (`serve`, `worker`,
//! `scheduler`): every client command is a noun group (`cache`, `task`,
//! `cron`) or a read-only view (`ps`, `top`).

/// `println!` for the client's output, through [`output::line`]: a reader
/// that went away (`koo task dead --json | head -1`) ends the command
/// quietly instead of a panic.
macro_rules! outln {
    () => {
        $crate::cli::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))
    };
}

pub mod cache;
mod cache_watch;
pub mod connect;
pub mod cron;
pub mod limit;
pub mod output;
pub mod ps;
pub mod queue;
pub mod task;
pub mod top;
pub mod values;
mod watch;

use std::process::ExitCode;

pub use self::connect::{Conn, ConnectArgs};

/// What a client command's exit code means (documented in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It worked.
    Ok = 0,
    /// The answer is "no": a task ended FAILED, CANCELLED or TIMED_OUT, a
    /// cache key is not there.
    No = 1,
    /// Bad input (clap's own usage errors exit 2 as well).
    Usage = 2,
    /// koo could not be reached, or a call failed (the gRPC code is printed).
    Rpc = 3,
}

impl From<ExitStatus> for ExitCode {
    fn from(s: ExitStatus) -> Self {
        ExitCode::from(s as u8)
    }
}

/// Why a client command stopped.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Input that parsed but cannot be used (names the argument).
    #[error("{0}")]
    Usage(String),
    /// No connection to koo.
    #[error("cannot reach koo at {target}: {reason}")]
    Unreachable {
        /// `--target`, as given.
        target: String,
        /// What the transport said.
        reason: String,
    },
    /// koo answered with an error status.
    #[error("{code} from {target}: {message}")]
    Rpc {
        /// `--target`, as given.
        target: String,
        /// The gRPC code's name (`NOT_FOUND`, ...).
        code: &'static str,
        /// koo's message.
        message: String,
    },
    /// The answer is "no" (the message says what).
    #[error("{0}")]
    No(String),
    /// Writing to the terminal failed.
    #[error("terminal: {0}")]
    Io(#[from] std::io::Error),
}

impl CliError {
    /// The exit status this error ends the command with.
    pub fn status(&self) -> ExitStatus {
        match self {
            CliError::Usage(_) => ExitStatus::Usage,
            CliError::No(_) => ExitStatus::No,
            CliError::Unreachable { .. } | CliError::Rpc { .. } | CliError::Io(_) => {
                ExitStatus::Rpc
            }
        }
    }
}

/// The exit code of a command's result, its error printed on one line.
pub fn finish(result: Result<ExitStatus, CliError>) -> ExitCode {
    match result {
        Ok(status) => status.into(),
        Err(e) => {
            eprintln!("koo: {e}");
            e.status().into()
        }
    }
}
