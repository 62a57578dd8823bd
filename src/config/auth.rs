//! Authentication flags: the keys file, its reload pace, reflection, and
//! `koo auth new-key`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::parse_positive_duration;
use crate::auth::{AuthSettings, Reflection};

/// `koo serve`'s authentication flags.
#[derive(Debug, Args)]
pub struct AuthArgs {
    /// TOML file of API key digests and mTLS principals with their roles;
    /// re-read when it changes. Unset: no keys (open, or only
    /// KOO_WORKER_TOKEN for WorkerService).
    #[arg(long, env = "KOO_AUTH_FILE", value_name = "KOO_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// How often the keys file is checked for changes.
    #[arg(long, env = "KOO_AUTH_RELOAD_INTERVAL", value_name = "KOO_AUTH_RELOAD_INTERVAL",
          default_value = "5s", value_parser = parse_positive_duration)]
    pub auth_reload_interval: Duration,
    /// Server reflection: `on` (with a keys file: any key, reader and above or
    /// worker), `public` (anyone), `off` (not served).
    #[arg(
        long,
        env = "KOO_REFLECTION",
        value_name = "KOO_REFLECTION",
        default_value = "on"
    )]
    pub reflection: Reflection,
}

impl AuthArgs {
    /// The settings these flags make.
    pub fn settings(&self) -> AuthSettings {
        AuthSettings {
            file: self.auth_file.clone().filter(|p| !p.as_os_str().is_empty()),
            reload_interval: self.auth_reload_interval,
            reflection: self.reflection,
        }
    }
}

/// `koo auth`: API keys.
#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Print a fresh API key and the keys-file entry to paste (the file
    /// holds only the key's SHA-256).
    NewKey(NewKeyArgs),
}

/// `koo auth new-key`.
#[derive(Debug, Args)]
pub struct NewKeyArgs {
    /// The key's name, shown in logs and audit lines.
    #[arg(long)]
    pub name: String,
    /// reader, writer, admin or worker.
    #[arg(long)]
    pub role: String,
    /// A worker key's queues (comma-separated); unset: any.
    #[arg(long, value_delimiter = ',')]
    pub queues: Vec<String>,
    /// A worker key's task names (comma-separated); unset: any.
    #[arg(long, value_delimiter = ',')]
    pub task_names: Vec<String>,
    /// Most tasks a worker key may hold at once.
    #[arg(long)]
    pub max_held: Option<u32>,
}

impl NewKeyArgs {
    /// What to make.
    pub fn request(&self) -> crate::auth::new_key::Request {
        crate::auth::new_key::Request {
            name: self.name.clone(),
            role: self.role.clone(),
            queues: self.queues.clone(),
            task_names: self.task_names.clone(),
            max_held: self.max_held,
        }
    }
}
