//! The `amqp-exec` binary: parses flags, sets up logging, and dispatches to
//! the supervisor or a CLI tool. Exit statuses: 0 ok, 1 failure, 2 usage,
//! 69 broker unreachable, 78 config error.

use amqp_exec::cli::{self, Failure, PublishArgs};
use amqp_exec::config;
use amqp_exec::supervisor::{self, RunOptions};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "amqp-exec",
    version,
    about = "RabbitMQ consumer supervisor: one short-lived worker process per message"
)]
struct Cli {
    /// Config file [default: $AMQP_EXEC_CONFIG when set and not empty, else /etc/amqp-exec/config.toml].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log format; under journald, plain lines without timestamps are the default.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once per process; the size difference between variants is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Consume the configured queues and run a worker per message.
    Run {
        /// Exit 0 after this many jobs finished and were acked (at least 1).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        max_jobs: Option<u64>,
        /// Exit 0 once no delivery arrived for this long (e.g. 5s) and no job runs.
        #[arg(long, value_name = "DURATION", value_parser = cli::parse_duration_arg)]
        exit_when_idle: Option<Duration>,
    },
    /// Validate the config, check that each command can be started, and connect to the broker.
    Check,
    /// Publish test messages with publisher confirms.
    Publish {
        /// Broker URL [default: $AMQP_URL when set and not empty, else the config's, else amqp://guest:guest@127.0.0.1:5672/%2f].
        #[arg(long)]
        url: Option<String>,
        /// Publish to this queue through the default exchange.
        #[arg(long, conflicts_with = "exchange")]
        queue: Option<String>,
        /// Publish to this exchange.
        #[arg(long)]
        exchange: Option<String>,
        /// Routing key for --exchange.
        #[arg(long, requires = "exchange", conflicts_with = "queue")]
        routing_key: Option<String>,
        /// The body.
        #[arg(long, conflicts_with_all = ["file", "stdin"])]
        body: Option<String>,
        /// Read the body from a file.
        #[arg(long, conflicts_with = "stdin")]
        file: Option<PathBuf>,
        /// One message per input line.
        #[arg(long)]
        lines: bool,
        /// Publish each message this many times.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        count: u64,
        /// Header KEY=VALUE (repeatable).
        #[arg(long = "header", value_name = "KEY=VALUE", value_parser = cli::parse_header)]
        headers: Vec<(String, String)>,
        /// Message id; with several messages, ids get a numeric suffix (-1, -2, ...).
        #[arg(long)]
        message_id: Option<String>,
        /// The content_type property, e.g. `application/json` (the worker
        /// sees it in AMQP_EXEC_CONTENT_TYPE).
        #[arg(long)]
        content_type: Option<String>,
        /// Non-persistent messages (delivery mode 1).
        #[arg(long)]
        transient: bool,
        /// With --queue: declare the queue (durable, classic) if it does not exist.
        #[arg(long, requires = "queue", conflicts_with = "exchange")]
        declare: bool,
        /// Send the messages as tasks and print their replies (JSON lines with --lines).
        #[arg(long)]
        reply: bool,
        /// With --reply: how long to wait for the replies (1ms to 49 days); tasks not started by then expire.
        #[arg(long, requires = "reply", value_name = "DURATION", value_parser = cli::parse_reply_timeout, default_value = "30s")]
        timeout: Duration,
        /// `-` reads the body from standard input (also the default without --body or --file).
        #[arg(value_name = "-", id = "stdin")]
        stdin: Option<String>,
    },
    /// Inspect, replay or purge a queue's dead letters (`<queue>.dead`).
    Dead {
        #[command(subcommand)]
        action: DeadAction,
    },
    /// Show a running supervisor's queues, running jobs, failures and dead
    /// letters (its status page, from the metrics listener).
    Status {
        /// The metrics listener, host:port or http://host:port [default: the config's [metrics] listen].
        #[arg(long, visible_alias = "listen", value_name = "URL")]
        url: Option<String>,
        /// Refresh every SECONDS (default 2) until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2", value_parser = parse_watch)]
        watch: Option<Duration>,
        /// Print the JSON of /status.json as it came.
        #[arg(long)]
        json: bool,
    },
}

/// `--watch`: seconds between 0.1 and 3600.
fn parse_watch(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.1..=3600.0).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!("{s:?} is not a number of seconds from 0.1 to 3600")),
    }
}

#[derive(Subcommand)]
enum DeadAction {
    /// List dead letters, leaving them in place.
    List {
        /// Broker URL [default: $AMQP_URL when set and not empty, else the config's].
        #[arg(long)]
        url: Option<String>,
        /// The work queue whose dead letters (`<QUEUE>.dead`) to list.
        #[arg(long)]
        queue: String,
        /// List at most this many, oldest first [default: all].
        #[arg(long)]
        limit: Option<u32>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to their queue with attempts reset.
    Replay {
        /// Broker URL [default: $AMQP_URL when set and not empty, else the config's].
        #[arg(long)]
        url: Option<String>,
        /// The work queue whose dead letters (`<QUEUE>.dead`) to replay, and
        /// where they go back to.
        #[arg(long)]
        queue: String,
        /// Replay at most this many, oldest first [default: all].
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Delete all dead letters of a queue.
    Purge {
        /// Broker URL [default: $AMQP_URL when set and not empty, else the config's].
        #[arg(long)]
        url: Option<String>,
        /// The work queue whose dead letters (`<QUEUE>.dead`) to delete.
        #[arg(long)]
        queue: String,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

/// `eprintln!` that does not panic when stderr is closed (journald
/// restarted, or the reader of a pipe went away): the message is lost, and
/// the exit code still says what happened.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    // A failed write (stderr closed: journald restarted, or the reader of a
    // pipe went away) loses the line; by default tracing-subscriber would
    // report it with `eprintln!`, which panics on the same closed stderr,
    // in whichever task was logging.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Through a queue to a thread of its own: a slow stderr never
        // stalls the runtime.
        .with_writer(amqp_exec::logwriter::QueuedStderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text if journald => builder.with_ansi(false).without_time().init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder.with_ansi(std::io::stderr().is_terminal()).init()
        }
    }
}

pub(crate) fn main() {
    // SAFETY: first thing in main, before any other thread starts.
    unsafe { amqp_exec::broker::use_thread_stack() };
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if !matches!(cli.command, Command::Run { .. }) {
        // The CLI tools print to pipes (`| head`): die quietly when the reader goes away.
        // SAFETY: setting a signal disposition to the default before any thread starts.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    // An empty AMQP_EXEC_CONFIG counts as unset, like an empty AMQP_URL.
    let config = cli.config.clone().or_else(|| {
        std::env::var_os("AMQP_EXEC_CONFIG")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    let named = config.is_some();
    let config_path = config.unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    // `run` reads its config before the runtime starts, to size it.
    let run_config = match &cli.command {
        Command::Run { .. } => match config::load(&config_path, amqp_url_env().as_deref()) {
            Ok(cfg) => Some(cfg),
            Err(e) => {
                let f = Failure::from(e);
                errln!("amqp-exec: {}", f.message);
                exit(f.code);
            }
        },
        _ => None,
    };
    if let Some(cfg) = &run_config {
        start_tracing(cfg);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = run_config.as_ref().and_then(runtime_threads) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            errln!("amqp-exec: cannot start the async runtime: {e}");
            exit(1);
        }
    };
    // On a runtime thread, whose stack is broker::THREAD_STACK: the main
    // thread's is smaller, and dead letters may carry deeply nested headers.
    let result = runtime.block_on(async move {
        match tokio::spawn(dispatch(cli.command, config_path, named, run_config)).await {
            Ok(result) => result,
            Err(e) => Err(Failure::new(1, format!("internal error: {e}"))),
        }
    });
    amqp_exec::trace::shutdown(TRACE_FLUSH);
    if let Err(f) = result {
        errln!("amqp-exec: {}", f.message);
        exit(f.code);
    }
    amqp_exec::logwriter::flush(LOG_FLUSH_LIMIT);
}

/// How long the log's queued lines may take to be written at exit.
const LOG_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Exits with `code` once the log's queued lines are written.
fn exit(code: i32) -> ! {
    amqp_exec::logwriter::flush(LOG_FLUSH_LIMIT);
    std::process::exit(code)
}

/// How long the spans still queued may take to export at exit.
const TRACE_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// `[tracing]` and the `OTEL_*` variables: a mistake is a config error.
fn start_tracing(cfg: &config::Config) {
    match amqp_exec::trace::init(&cfg.tracing) {
        Ok(Some(url)) => tracing::info!("exporting spans to {url}"),
        Ok(None) => {}
        Err(e) => {
            errln!("amqp-exec: {e}");
            std::process::exit(config::EX_CONFIG);
        }
    }
}

/// Worker threads for `run`'s runtime: one when the config lets only one
/// job run at a time, where a second thread only adds wake-ups between the
/// two on every job; else tokio's default, one per core. None also when
/// `TOKIO_WORKER_THREADS` is set, which tokio then follows.
fn runtime_threads(cfg: &config::Config) -> Option<usize> {
    let set = std::env::var_os("TOKIO_WORKER_THREADS").is_some_and(|v| !v.is_empty());
    (!set && cfg.jobs_at_once() <= 1).then_some(1)
}

fn amqp_url_env() -> Option<String> {
    std::env::var("AMQP_URL").ok().filter(|s| !s.is_empty())
}

/// The broker of `publish` and `dead`: `--url` (a bad one is a usage
/// error), else AMQP_URL, else the config's.
fn cli_broker(
    flag: Option<String>,
    config_path: &std::path::Path,
    named: bool,
) -> Result<config::BrokerConfig, Failure> {
    if let Some(u) = &flag {
        amqp_exec::uri::parse_uri(u).map_err(|e| Failure::new(2, format!("--url: {e}")))?;
    }
    let url = flag.or_else(amqp_url_env);
    cli::broker_for_cli(url.as_deref(), config_path, named)
}

/// `run_config`: `run`'s config, read by `main`.
async fn dispatch(
    command: Command,
    config_path: PathBuf,
    named: bool,
    run_config: Option<config::Config>,
) -> Result<(), Failure> {
    match command {
        Command::Run {
            max_jobs,
            exit_when_idle,
        } => {
            let url_override = amqp_url_env();
            let cfg = run_config.expect("main reads run's config before the runtime starts");
            supervisor::run(
                cfg,
                RunOptions {
                    max_jobs,
                    exit_when_idle,
                    url_override,
                },
            )
            .await
            .map_err(|e| Failure::new(1, e))
        }
        Command::Check => {
            let cfg = config::load(&config_path, amqp_url_env().as_deref())?;
            cli::check(&cfg).await
        }
        Command::Publish {
            url,
            queue,
            exchange,
            routing_key,
            body,
            file,
            lines,
            count,
            headers,
            message_id,
            content_type,
            transient,
            declare,
            reply,
            timeout,
            stdin,
        } => {
            if let Some(s) = &stdin
                && s != "-"
            {
                return Err(Failure::new(
                    2,
                    format!(
                        "unexpected argument {s:?}: use --body, --file, or - for standard input"
                    ),
                ));
            }
            let args = PublishArgs {
                queue,
                exchange,
                routing_key,
                body,
                file,
                lines,
                count,
                headers,
                message_id,
                content_type,
                transient,
                declare,
                reply_timeout: reply.then_some(timeout),
            };
            // Usage errors first, before the config is read.
            cli::check_publish_args(&args)?;
            let broker = cli_broker(url, &config_path, named)?;
            cli::publish(&broker, args).await
        }
        Command::Status { url, watch, json } => {
            let addr = match url {
                Some(u) => cli::status::parse_status_url(&u)
                    .map_err(|e| Failure::new(2, format!("--url: {e}")))?,
                None => cli::status::addr_from_config(&config_path)?,
            };
            cli::status(cli::StatusArgs { addr, watch, json }).await
        }
        Command::Dead { action } => match action {
            DeadAction::List {
                url,
                queue,
                limit,
                json,
            } => {
                let broker = cli_broker(url, &config_path, named)?;
                cli::dead_list(&broker, &queue, limit, json).await
            }
            DeadAction::Replay { url, queue, limit } => {
                let broker = cli_broker(url, &config_path, named)?;
                cli::dead_replay(&broker, &queue, limit).await
            }
            DeadAction::Purge { url, queue, yes } => {
                let broker = cli_broker(url, &config_path, named)?;
                cli::dead_purge(&broker, &queue, yes).await
            }
        },
    }
}
