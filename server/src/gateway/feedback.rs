//! Feedback: joined to impressions, handed to workers, acknowledged once sealed.

use freshet_proto::gateway::v1::{FeedbackEvent, FeedbackResponse};
use tonic::{Response, Status};

use super::service::GatewayService;

impl GatewayService {
    pub(crate) async fn handle_feedback(
        &self,
        events: Vec<FeedbackEvent>,
    ) -> Result<Response<FeedbackResponse>, Status> {
        let _ = events;
        Err(Status::unimplemented(
            "feedback is not wired to workers yet",
        ))
    }
}
