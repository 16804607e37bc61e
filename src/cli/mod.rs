//! The command-line tools beside `run`, one file each: [`publish`](mod@publish)
//! (test messages with confirms, and tasks with their replies),
//! [`check`](mod@check) (config, commands, broker), and [`dead`] (list,
//! replay and purge dead letters), [`status`](mod@status) (the status page
//! of a running supervisor, as tables); [`session`] is their broker
//! connection.

pub mod check;
pub mod dead;
pub mod publish;
pub mod session;
pub mod status;

pub use check::check;
pub use dead::{DeadEntry, dead_list, dead_purge, dead_replay};
pub use publish::{
    PublishArgs, check_publish_args, parse_duration_arg, parse_header, parse_reply_timeout, publish,
};
pub use status::{StatusArgs, status};

use crate::config;

/// Exit status when the broker cannot be reached (sysexits.h `EX_UNAVAILABLE`).
pub const EX_UNAVAILABLE: i32 = 69;

/// A failed command: what to print and the exit status.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<config::ConfigError> for Failure {
    fn from(e: config::ConfigError) -> Self {
        Failure::new(config::EX_CONFIG, e.to_string())
    }
}

/// Broker settings for the CLI tools: `--url`/`AMQP_URL`, else the config
/// file's when one is named or exists at the default path, else localhost.
pub fn broker_for_cli(
    url: Option<&str>,
    config_path: &std::path::Path,
    config_named: bool,
) -> Result<config::BrokerConfig, Failure> {
    let defaults = || {
        config::parse(
            "[[queue]]\nname = \"x\"\ncommand = [\"x\"]\n",
            std::path::Path::new("(defaults)"),
            url,
        )
        .map(|c| c.broker)
    };
    let base = if config_named {
        config::load(config_path, url)?.broker
    } else if config_path.exists() {
        match config::load(config_path, url) {
            Ok(c) => c.broker,
            // The service's config may be unreadable to this user; with a
            // URL given it is not needed.
            Err(e) if url.is_some() && !e.file.as_os_str().is_empty() => {
                tracing::warn!("not using {}: {e}", config_path.display());
                defaults()?
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        defaults()?
    };
    Ok(base)
}
