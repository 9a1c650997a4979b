//! Message lifecycle. The cloud keeps one status per message; gateway feedback moves it forward
//! and never back, and a final status never changes.

use serde::{Deserialize, Serialize};

/// What a gateway reports about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackOutcome {
    /// Committed to the gateway's inbox; the gateway now owns delivery.
    Received,
    /// The device executed it.
    Completed,
    /// The device, or the gateway's mapping, said no.
    Rejected,
    /// The TTL passed before it could be executed; never executed.
    Expired,
    /// Could not be executed, with the reason; the device certainly did not run it.
    Failed,
    /// The command was written to the device but its answer was lost, garbled, cut off or
    /// late: the device may have run it. Final; check the device before sending it again.
    MayHaveRun,
}

/// A message's status as the operator API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    Queued,
    Delivered,
    Completed,
    Rejected,
    Expired,
    Failed,
    MayHaveRun,
    Purged,
}

impl MessageStatus {
    /// Final statuses never change again.
    pub fn is_final(self) -> bool {
        !matches!(self, MessageStatus::Queued | MessageStatus::Delivered)
    }

    /// Wire and database name.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Queued => "queued",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Completed => "completed",
            MessageStatus::Rejected => "rejected",
            MessageStatus::Expired => "expired",
            MessageStatus::Failed => "failed",
            MessageStatus::MayHaveRun => "may_have_run",
            MessageStatus::Purged => "purged",
        }
    }

    /// Parses the database name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => MessageStatus::Queued,
            "delivered" => MessageStatus::Delivered,
            "completed" => MessageStatus::Completed,
            "rejected" => MessageStatus::Rejected,
            "expired" => MessageStatus::Expired,
            "failed" => MessageStatus::Failed,
            "may_have_run" => MessageStatus::MayHaveRun,
            "purged" => MessageStatus::Purged,
            _ => return None,
        })
    }

    /// The status after `feedback`, or `None` when the feedback does not apply (the status is
    /// already final, or the feedback would move it backwards).
    pub fn apply(self, feedback: FeedbackOutcome) -> Option<MessageStatus> {
        if self.is_final() {
            return None;
        }
        let next = match feedback {
            FeedbackOutcome::Received => MessageStatus::Delivered,
            FeedbackOutcome::Completed => MessageStatus::Completed,
            FeedbackOutcome::Rejected => MessageStatus::Rejected,
            FeedbackOutcome::Expired => MessageStatus::Expired,
            FeedbackOutcome::Failed => MessageStatus::Failed,
            FeedbackOutcome::MayHaveRun => MessageStatus::MayHaveRun,
        };
        if next == self {
            None
        } else {
            Some(next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FeedbackOutcome as F;
    use MessageStatus as S;

    #[test]
    fn feedback_moves_forward_only() {
        assert_eq!(S::Queued.apply(F::Received), Some(S::Delivered));
        assert_eq!(S::Delivered.apply(F::Completed), Some(S::Completed));
        assert_eq!(S::Queued.apply(F::Completed), Some(S::Completed));
        assert_eq!(S::Delivered.apply(F::Received), None);
    }

    #[test]
    fn final_statuses_never_change() {
        for s in [
            S::Completed,
            S::Rejected,
            S::Expired,
            S::Failed,
            S::MayHaveRun,
            S::Purged,
        ] {
            assert!(s.is_final());
            for f in [
                F::Received,
                F::Completed,
                F::Rejected,
                F::Expired,
                F::Failed,
                F::MayHaveRun,
            ] {
                assert_eq!(s.apply(f), None, "{s:?} + {f:?}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for s in [
            S::Queued,
            S::Delivered,
            S::Completed,
            S::Rejected,
            S::Expired,
            S::Failed,
            S::MayHaveRun,
            S::Purged,
        ] {
            assert_eq!(S::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
