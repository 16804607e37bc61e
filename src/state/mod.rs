//! The state that the connection loop, the consumer loops and the jobs
//! share, as small parts with one job each, below the code that uses them:
//!
//! - [`drain`]: shutdown and drain (stop, interrupt, running jobs, the
//!   settle limit, closing ended consumers' channels);
//! - [`budget`]: `--max-jobs` and `--exit-when-idle`;
//! - [`readiness`]: what systemd is told;
//! - [`queues`]: each configured queue's state, and the registry that
//!   reloads replace entries of, and the running workers (each queue's
//!   count, summed);
//! - [`activity`]: the jobs in progress and each queue's recent activity,
//!   for the status page.
//!
//! [`Shared`] bundles them with the worker slots, the memory of messages,
//! the signing key and the connection counters.

pub mod activity;
pub mod budget;
pub mod drain;
pub mod queues;
pub mod readiness;

pub use activity::Activity;
pub use budget::{DeliveryInHand, JobBudget};
pub use drain::Drain;
pub use queues::{QueueState, Registry};
pub use readiness::Readiness;

use crate::config::Config;
use crate::memory::Memory;
use crate::metrics::GlobalStats;
use crate::signing::SigningKey;
use crate::slots::GlobalSlots;
use std::sync::Arc;

/// See the module's doc.
pub struct Shared {
    pub drain: Drain,
    pub budget: Arc<JobBudget>,
    pub readiness: Readiness,
    pub registry: Arc<Registry>,
    /// `max_workers` slots. Without a `max_workers` key there is no cap
    /// beyond the queues' own `concurrency`, so reloads never wait on it.
    pub global: GlobalSlots,
    /// What the instance remembers of messages across deliveries.
    pub memory: Arc<Memory>,
    /// The key of signed control headers (the first config's: a reload
    /// does not change it).
    pub signing_key: SigningKey,
    pub stats: Arc<GlobalStats>,
    /// The jobs in progress.
    pub activity: Arc<Activity>,
}

impl Shared {
    /// The state of a supervisor starting with `cfg`, with `--max-jobs`.
    pub fn new(cfg: &Config, max_jobs: Option<u64>) -> Shared {
        let drain = Drain::new(cfg.shutdown_grace);
        let budget = JobBudget::new(max_jobs, drain.stop.clone());
        let global = GlobalSlots::new(cfg.max_workers);
        let stats = GlobalStats {
            workers: Some(global.metrics_view()),
            ..GlobalStats::default()
        };
        Shared {
            budget: Arc::new(budget),
            drain,
            readiness: Readiness::new(cfg.queues.len()),
            registry: Arc::new(Registry::new(cfg.own_queues())),
            global,
            memory: Arc::default(),
            signing_key: cfg.signing_key.clone(),
            stats: Arc::new(stats),
            activity: Arc::default(),
        }
    }

    /// The longest `kill_grace` of the configured queues.
    pub fn kill_grace(&self) -> std::time::Duration {
        self.registry
            .queues()
            .iter()
            .map(|q| q.cfg.kill_grace)
            .max()
            .unwrap_or_default()
    }
}
