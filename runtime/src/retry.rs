//! Retrying store calls through outages: transient failures (lost connections, a restarting
//! server) back off exponentially with jitter; everything else fails at once.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::error::Result;

/// How long the engine keeps retrying a store that is unreachable before giving up.
pub(crate) const STORE_OUTAGE_BUDGET: Duration = Duration::from_mins(1);

fn store_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_secs(2))
        .with_factor(2.0)
        .with_jitter()
        .with_total_delay(Some(STORE_OUTAGE_BUDGET))
        .without_max_times()
}

/// Runs a store call, retrying transient failures.
pub(crate) async fn store_call<T, F, Fut>(call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    call.retry(store_backoff())
        .sleep(tokio::time::sleep)
        .when(crate::error::Error::is_transient)
        .notify(|error, delay| tracing::warn!(%error, ?delay, "checkpoint store unavailable; retrying"))
        .await
}
