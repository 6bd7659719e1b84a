//! A client of the gateway (`freshet.gateway.v1.Gateway`) for services, tools and tests.

use std::time::Duration;

use freshet_proto::gateway::v1::{gateway_client::GatewayClient, RankRequest, UpsertItemsRequest};
use freshet_proto::ps::v1::Item;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::ClientError;

/// How long a new catalog may take to become rankable by default (a fresh cluster elects
/// leaders and seals its first epochs in this time even on a loaded machine).
pub const UPSERT_WAIT_DEFAULT: Duration = Duration::from_secs(60);

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
