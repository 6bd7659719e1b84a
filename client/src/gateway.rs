//! A client of the gateway (`freshet.gateway.v1.Gateway`) for services, tools and tests:
//! Rank, Feedback and catalog upserts under one retry policy, and the feedback events for
//! a ranked answer.
//!
//! Re-sending Feedback is safe: the gateway drops an event id it has seen, so a retried
//! call trains each event once.

use std::future::Future;
use std::time::Duration;

use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, FeedbackEvent, FeedbackRequest, FeedbackResponse, RankRequest,
    RankResponse, RankedItem, RecommendRequest, Reward, UpsertItemsRequest,
};
use freshet_proto::ps::v1::Item;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::ClientError;

/// How long a new catalog may take to become rankable by default (a fresh cluster elects
/// leaders and seals its first epochs in this time even on a loaded machine).
pub const UPSERT_WAIT_DEFAULT: Duration = Duration::from_secs(60);

/// When a failed call is tried again: until `deadline` after the first attempt, `pause`
/// apart, for any status but the ones that say the request itself is wrong.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub deadline: Duration,
    pub pause: Duration,
}

impl RetryPolicy {
    /// One attempt (benchmarks count failures instead of hiding them).
    pub const NEVER: RetryPolicy = RetryPolicy {
        deadline: Duration::ZERO,
        pause: Duration::ZERO,
    };

    /// Tries again for up to `deadline`, 50 ms apart.
    pub fn for_up_to(deadline: Duration) -> Self {
        RetryPolicy {
            deadline,
            pause: Duration::from_millis(50),
        }
    }

    /// Whether `s` may succeed if sent again unchanged.
    pub fn retryable(s: &Status) -> bool {
        !matches!(
            s.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::Unimplemented
        )
    }

    /// Runs `op` under this policy.
    ///
    /// # Errors
    /// The last status once the deadline passed ([`ClientError::Deadline`] when there was
    /// more than one attempt), or a status that retrying cannot fix.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + self.deadline;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match op().await {
                Ok(v) => return Ok(v),
                Err(s) if Self::retryable(&s) && Instant::now() < deadline => {
                    tracing::debug!(code = ?s.code(), error = s.message(), "gateway call retried");
                    tokio::time::sleep(self.pause).await;
                }
                Err(s) if attempts == 1 => return Err(ClientError::Status(s)),
                Err(s) => {
                    return Err(ClientError::Deadline {
                        attempts,
                        last: format!("{:?}: {}", s.code(), s.message()),
                    })
                }
            }
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::for_up_to(Duration::from_secs(30))
    }
}

/// A gateway connection with a retry policy. Cheap to clone (one HTTP/2 channel).
#[derive(Clone)]
pub struct Gateway {
    client: GatewayClient<Channel>,
    pub retry: RetryPolicy,
}

impl Gateway {
    /// A lazily connecting client of the gateway at `addr` (TCP_NODELAY on).
    ///
    /// # Errors
    /// A malformed address.
    pub fn connect(addr: &str, retry: RetryPolicy) -> Result<Self, ClientError> {
        let ch = crate::endpoint(addr).map_err(|e| ClientError::Invalid(e.to_string()))?;
        Ok(Gateway {
            client: GatewayClient::new(ch),
            retry,
        })
    }

    /// Wraps an existing generated client.
    pub fn from_client(client: GatewayClient<Channel>, retry: RetryPolicy) -> Self {
        Gateway { client, retry }
    }

    /// The generated client underneath (for calls this type does not wrap).
    pub fn raw(&self) -> GatewayClient<Channel> {
        self.client.clone()
    }

    /// Rank under the retry policy.
    ///
    /// # Errors
    /// See [`RetryPolicy::run`].
    pub async fn rank(&self, req: &RankRequest) -> Result<RankResponse, ClientError> {
        self.retry
            .run(|| {
                let mut c = self.client.clone();
                let req = req.clone();
                async move { c.rank(req).await.map(tonic::Response::into_inner) }
            })
            .await
    }

    /// Recommend under the retry policy (retrieval over the catalog, then Rank).
    ///
    /// # Errors
    /// See [`RetryPolicy::run`].
    pub async fn recommend(&self, req: &RecommendRequest) -> Result<RankResponse, ClientError> {
        self.retry
            .run(|| {
                let mut c = self.client.clone();
                let req = req.clone();
                async move { c.recommend(req).await.map(tonic::Response::into_inner) }
            })
            .await
    }

    /// Feedback under the retry policy (safe to re-send: events are deduplicated by id).
    ///
    /// # Errors
    /// See [`RetryPolicy::run`].
    pub async fn feedback(
        &self,
        events: &[FeedbackEvent],
    ) -> Result<FeedbackResponse, ClientError> {
        self.retry
            .run(|| {
                let mut c = self.client.clone();
                let events = events.to_vec();
                async move {
                    c.feedback(FeedbackRequest { events })
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await
    }

    /// UpsertItems under the retry policy (safe to re-send: an upsert of the same items
    /// writes the same state).
    ///
    /// # Errors
    /// See [`RetryPolicy::run`].
    pub async fn upsert(&self, req: &UpsertItemsRequest) -> Result<(), ClientError> {
        self.retry
            .run(|| {
                let mut c = self.client.clone();
                let req = req.clone();
                async move { c.upsert_items(req).await.map(|_| ()) }
            })
            .await
    }

    /// [`upsert_and_wait`] on this connection.
    ///
    /// # Errors
    /// As [`upsert_and_wait`].
    pub async fn upsert_and_wait(
        &self,
        items: &[Item],
        timeout: Duration,
    ) -> Result<(), ClientError> {
        upsert_and_wait(&mut self.client.clone(), items, timeout).await
    }
}

/// The feedback events for a ranked answer: `outcome` says, per shown item, whether to
/// report it (None: skip) and whether it was clicked. Event ids are
/// `{prefix}-{position}`, so re-sending the same answer's events is deduplicated.
pub fn events_for(
    ranked: &RankResponse,
    prefix: &str,
    mut outcome: impl FnMut(&RankedItem) -> Option<bool>,
) -> Vec<FeedbackEvent> {
    ranked
        .items
        .iter()
        .filter_map(|it| {
            let clicked = outcome(it)?;
            Some(FeedbackEvent {
                event_id: format!("{prefix}-{}", it.position),
                impression_id: ranked.impression_id.clone(),
                item_id: it.item_id,
                position: it.position,
                rewards: if clicked {
                    vec![Reward::default()]
                } else {
                    vec![]
                },
                event_time_ms: 0,
            })
        })
        .collect()
}

/// Upserts `items` into the catalog and waits until a Rank over them succeeds (their
/// rows are in the model version the gateway serves). Retries every 200 ms: the
/// gateway may still be bootstrapping its replica, or the upsert not yet sealed.
///
/// # Errors
/// [`ClientError::Deadline`] when the items are not rankable within `timeout`.
pub async fn upsert_and_wait(
    gw: &mut GatewayClient<Channel>,
    items: &[Item],
    timeout: Duration,
) -> Result<(), ClientError> {
    let deadline = Instant::now() + timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let upserted = gw
            .upsert_items(UpsertItemsRequest {
                items: items.to_vec(),
                sets: vec![],
            })
            .await;
        let last = match upserted {
            Ok(_) => {
                let req = RankRequest {
                    candidates: items.iter().map(|i| i.id).collect(),
                    k: 1,
                    ..Default::default()
                };
                match gw.rank(req).await {
                    Ok(_) => return Ok(()),
                    Err(s) => s.to_string(),
                }
            }
            Err(s) => s.to_string(),
        };
        if Instant::now() > deadline {
            return Err(ClientError::Deadline { attempts, last });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_transient_errors_only_until_the_deadline() {
        let policy = RetryPolicy {
            deadline: Duration::from_millis(200),
            pause: Duration::from_millis(10),
        };
        let mut calls = 0;
        let r: Result<u32, _> = policy
            .run(|| {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err(Status::unavailable("starting"))
                    } else {
                        Ok(7)
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls, 3);

        let mut calls = 0;
        let r: Result<u32, _> = policy
            .run(|| {
                calls += 1;
                async { Err(Status::invalid_argument("k: must be >= 1")) }
            })
            .await;
        assert!(matches!(r, Err(ClientError::Status(s)) if s.code() == Code::InvalidArgument));
        assert_eq!(calls, 1, "a bad request is not re-sent");

        let r: Result<u32, _> = policy
            .run(|| async { Err(Status::unavailable("down")) })
            .await;
        assert!(matches!(r, Err(ClientError::Deadline { attempts, .. }) if attempts > 1));
    }

    #[test]
    fn events_name_each_shown_slot_once() {
        let ranked = RankResponse {
            impression_id: "imp".into(),
            items: (1..=3)
                .map(|p| RankedItem {
                    item_id: 10 + u64::from(p),
                    position: p,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let evs = events_for(&ranked, "u7", |it| {
            (it.position != 2).then_some(it.position == 3)
        });
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].event_id, "u7-1");
        assert!(evs[0].rewards.is_empty());
        assert_eq!(evs[1].event_id, "u7-3");
        assert_eq!(evs[1].rewards.len(), 1);
        assert_eq!(evs[1].impression_id, "imp");
    }
}
