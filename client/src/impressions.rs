//! Impressions and feedback events' step assignments on the shards (see the
//! `AppendImpressions`, `GetImpressions` and `AssignEvents` RPCs): what gateways write
//! after each Rank and read to join feedback, and what workers claim before a step.

use freshet_proto::impression_shard;
use freshet_proto::ps::v1::{
    parameter_service_client::ParameterServiceClient, AppendImpressionsRequest,
    AssignEventsRequest, EventAssignResult, EventRef, GetImpressionsRequest, ImpressionRecord,
    StoredImpression,
};

use crate::{ClientError, PsClient};

impl PsClient {
    /// The shard that holds impression `id`.
    pub fn impression_shard(&self, id: &str) -> u32 {
        impression_shard(id, self.shard_count())
    }

    /// Stores impressions of one shard (all routed to `shard`); safe to repeat: ids
    /// already stored are kept as they are. Ok(how many were new).
    ///
    /// # Errors
    /// A non-retryable status (bad input) or the client's deadline.
    pub async fn append_impressions(
        &self,
        shard: u32,
        impressions: &[ImpressionRecord],
    ) -> Result<u32, ClientError> {
        let r = self
            .call(Some(shard), |ch, timeout| {
                let mut req = tonic::Request::new(AppendImpressionsRequest {
                    shard,
                    impressions: impressions.to_vec(),
                });
                req.set_timeout(timeout);
                async move {
                    ParameterServiceClient::new(ch)
                        .max_encoding_message_size(64 << 20)
                        .append_impressions(req)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        Ok(r.appended)
    }

    /// Reads impressions of one shard (linearizable): the ones found, with their events'
    /// assignments; unknown or expired ids are left out.
    ///
    /// # Errors
    /// A non-retryable status (bad input) or the client's deadline.
    pub async fn get_impressions(
        &self,
        shard: u32,
        ids: &[String],
    ) -> Result<Vec<StoredImpression>, ClientError> {
        let r = self
            .call(Some(shard), |ch, timeout| {
                let mut req = tonic::Request::new(GetImpressionsRequest {
                    shard,
                    ids: ids.to_vec(),
                });
                req.set_timeout(timeout);
                async move {
                    ParameterServiceClient::new(ch)
                        .max_decoding_message_size(64 << 20)
                        .get_impressions(req)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        Ok(r.found)
    }

    /// Claims events (all of impressions on `shard`) for step (inc, step); safe to
    /// repeat (an event already claimed for this step answers ASSIGNED again).
    ///
    /// # Errors
    /// A non-retryable status (bad input) or the client's deadline.
    pub async fn assign_events(
        &self,
        shard: u32,
        inc: u64,
        step: u64,
        events: &[EventRef],
    ) -> Result<Vec<EventAssignResult>, ClientError> {
        let r = self
            .call(Some(shard), |ch, timeout| {
                let mut req = tonic::Request::new(AssignEventsRequest {
                    shard,
                    inc,
                    step,
                    events: events.to_vec(),
                });
                req.set_timeout(timeout);
                async move {
                    ParameterServiceClient::new(ch)
                        .assign_events(req)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        Ok(r.results)
    }
}
