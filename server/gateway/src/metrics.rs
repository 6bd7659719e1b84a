//! Prometheus metric names of the gateway role (the recorder and the /metrics endpoint
//! are [`freshet_runtime::metrics`]).

use std::sync::Once;

pub use freshet_runtime::metrics::serve;

pub const GATEWAY_RANK_SECONDS: &str = "freshet_gateway_rank_duration_seconds";
pub const GATEWAY_RECOMMEND_SECONDS: &str = "freshet_gateway_recommend_duration_seconds";
pub const GATEWAY_EPOCH: &str = "freshet_gateway_epoch";
pub const GATEWAY_EPOCH_LAG: &str = "freshet_gateway_epoch_lag_seconds";
pub const FRESHNESS_SECONDS: &str = "freshet_freshness_seconds";
pub const FEEDBACK_EVENTS: &str = "freshet_gateway_feedback_events_total";
pub const MIN_EPOCH_MISSED: &str = "freshet_gateway_min_epoch_missed_total";
pub const IMPRESSION_DURABLE_SECONDS: &str = "freshet_gateway_impression_durable_seconds";
pub const IMPRESSIONS_LOST: &str = "freshet_gateway_impressions_lost_total";
pub const ANN_BUILD_SECONDS: &str = "freshet_gateway_ann_build_duration_seconds";
pub const ANN_EPOCH: &str = "freshet_gateway_ann_epoch";

static DESCRIBED: Once = Once::new();

/// Installs the process-wide recorder and describes the gateway metrics once.
pub fn install() {
    freshet_runtime::metrics::install();
    DESCRIBED.call_once(describe);
}

fn describe() {
    metrics::describe_histogram!(GATEWAY_RANK_SECONDS, "Rank latency on the gateway");
    metrics::describe_histogram!(
        GATEWAY_RECOMMEND_SECONDS,
        "Recommend latency on the gateway (retrieval over the catalog and ranking)"
    );
    metrics::describe_gauge!(
        GATEWAY_EPOCH,
        "sealed epoch of the model version the gateway serves"
    );
    metrics::describe_gauge!(
        GATEWAY_EPOCH_LAG,
        "age of the served epoch's seal (now - proposal time)"
    );
    metrics::describe_histogram!(
        FRESHNESS_SECONDS,
        "feedback arrival to the first served version containing its update"
    );
    metrics::describe_counter!(FEEDBACK_EVENTS, "feedback events acknowledged");
    metrics::describe_histogram!(
        IMPRESSION_DURABLE_SECONDS,
        "Rank answer to its impression's append acknowledged by the shard"
    );
    metrics::describe_counter!(
        IMPRESSIONS_LOST,
        "impressions whose append failed after retries (their feedback gets NOT_FOUND)"
    );
    metrics::describe_histogram!(
        ANN_BUILD_SECONDS,
        "time to build Recommend's approximate index from a published version"
    );
    metrics::describe_gauge!(
        ANN_EPOCH,
        "epoch of the version Recommend's approximate index was built from"
    );
    metrics::describe_counter!(
        MIN_EPOCH_MISSED,
        "Rank calls refused because their min_epoch was not served within the wait"
    );
}
