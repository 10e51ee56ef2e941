//! Surviving a member's death: which statuses mean the member that answered is gone
//! or broke, the retry of one call on other members of its role, and the request
//! that resumes a generation on another scheduler.
//!
//! A `Vision.Encode` or a `Scheduler.Submit` that fails that way is sent at once to
//! another member of the role, up to [`MAX_ATTEMPTS`] members in all
//! ([`call_with_retries`]); any other answer is final. A scheduler that fails
//! mid-stream is replaced by another one running [`resubmission`] (the loop is
//! `generation::Running::next`). A request no member could serve fails
//! UNAVAILABLE ([`Error::Unserved`]), naming the members that failed.

use std::future::Future;

use tessera_proto::internal::v1::{Stopping, SubmitRequest};
use tessera_runtime::{Member, Role};

use crate::error::{Error, Result};

/// Members one call is tried on, in all, before the request fails.
pub const MAX_ATTEMPTS: usize = 3;

/// Times one generation moves to another scheduler after its stream broke.
pub const MAX_FAILOVERS: usize = 3;

/// Whether `status` says the member that sent it is gone or broke, so that another
/// member may well serve the call: UNAVAILABLE, UNKNOWN, ABORTED, CANCELLED (the
/// gateway never cancels a call it still reads; a dropped call shows no status),
/// and an INTERNAL status that carries a source error, which this side's transport
/// made when the connection or stream broke (tonic reports a peer's stream reset as
/// INTERNAL "h2 protocol error"; `scheduler/src/dispatch.rs::classify` does the
/// same for expert-workers).
pub fn member_gone(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Aborted | Code::Cancelled => true,
        Code::Internal => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// The members of one role that failed one request, in order, and why the last one
/// did.
#[derive(Debug, Clone)]
pub struct Failed {
    role: Role,
    ids: Vec<String>,
    last: String,
}

impl Failed {
    /// None of `role` failed yet.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            ids: Vec::new(),
            last: String::new(),
        }
    }

    /// The ids of the members that failed, in order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Records that `member` failed, for `why`.
    pub fn record(&mut self, member: &Member, why: impl Into<String>) {
        self.ids.push(member.id.clone());
        self.last = why.into();
    }

    /// The request's error now that no member is left to try: UNAVAILABLE.
    pub fn unserved(&self) -> Error {
        Error::Unserved {
            role: self.role,
            failed: self.ids.clone(),
            last: self.last.clone(),
        }
    }

    /// `e`, from picking a member, as the request's error: with members already
    /// failed, running out of members is [`Failed::unserved`].
    fn no_member_left(&self, e: Error) -> Error {
        match e {
            Error::NoMember(_) if !self.ids.is_empty() => self.unserved(),
            e => e,
        }
    }
}

/// Calls a member of `failed`'s role until one answers, at most [`MAX_ATTEMPTS`]
/// members in all: `pick` chooses a member not among the ids it is given (those
/// in `failed`) and a client to it; `call` makes the call. A status that says the
/// member is gone ([`member_gone`]) is recorded in `failed` and the call goes to
/// another member; any other status is final. Returns the member that answered and
/// its answer.
pub async fn call_with_retries<C, T, Fut>(
    failed: &mut Failed,
    mut pick: impl FnMut(&[String]) -> Result<(Member, C)>,
    mut call: impl FnMut(C) -> Fut,
) -> Result<(Member, T)>
where
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let role = failed.role;
    for attempt in 1..=MAX_ATTEMPTS {
        let (member, client) = pick(failed.ids()).map_err(|e| failed.no_member_left(e))?;
        match call(client).await {
            Ok(answer) => return Ok((member, answer)),
            Err(status) if member_gone(&status) => {
                tracing::warn!(
                    %role,
                    member = %member.id,
                    attempt,
                    %status,
                    "the call failed; trying another member"
                );
                failed.record(&member, status_text(role, &status));
            }
            Err(status) => return Err(Error::upstream(role, status)),
        }
    }
    Err(failed.unserved())
}

/// What the client is told of a member's failure: its role, code and message.
pub fn status_text(role: Role, status: &tonic::Status) -> String {
    format!("{role}: {:?}: {}", status.code(), status.message())
}

/// The request that resumes `original` on another scheduler after `streamed` tokens
/// were generated: the prompt followed by those tokens, which `resumed_tokens`
/// marks as output, and `max_tokens` lowered by as many. Image runs keep their
/// positions (the prompt does not move). `None` when `max_tokens` is used up: the
/// generation is complete.
pub fn resubmission(original: &SubmitRequest, streamed: &[u32]) -> Option<SubmitRequest> {
    let stopping = original.stopping.clone().unwrap_or_default();
    let done = u32::try_from(streamed.len()).ok()?;
    let max_tokens = stopping.max_tokens.checked_sub(done).filter(|&n| n > 0)?;
    let mut input_ids = Vec::with_capacity(original.input_ids.len() + streamed.len());
    input_ids.extend_from_slice(&original.input_ids);
    input_ids.extend_from_slice(streamed);
    Some(SubmitRequest {
        input_ids,
        stopping: Some(Stopping {
            max_tokens,
            ..stopping
        }),
        resumed_tokens: original.resumed_tokens + done,
        ..original.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::internal::v1::{ImageRun, Sampling};
    use tonic::Code;

    fn original() -> SubmitRequest {
        SubmitRequest {
            request_id: "r~0123456789ab".into(),
            model_fingerprint: "fp".into(),
            input_ids: vec![1, 2, 3, 4, 5],
            image_runs: vec![ImageRun {
                start: 1,
                len: 2,
                ..Default::default()
            }],
            sampling: Some(Sampling {
                temperature: 0.7,
                seed: 9,
                ..Default::default()
            }),
            stopping: Some(Stopping {
                max_tokens: 10,
                stop: vec!["END".into()],
                ignore_eos: false,
            }),
            resumed_tokens: 0,
        }
    }

    #[test]
    fn a_resubmission_appends_the_streamed_tokens_as_resumed_output() {
        let original = original();
        let again = resubmission(&original, &[70, 71, 72]).unwrap();
        assert_eq!(again.input_ids, [1, 2, 3, 4, 5, 70, 71, 72]);
        assert_eq!(again.resumed_tokens, 3);
        let stopping = again.stopping.as_ref().unwrap();
        assert_eq!(stopping.max_tokens, 7);
        assert_eq!(stopping.stop, ["END"]);
        // Everything else is the original's: id, fingerprint, image runs, sampling.
        assert_eq!(
            SubmitRequest {
                input_ids: original.input_ids.clone(),
                stopping: original.stopping.clone(),
                resumed_tokens: 0,
                ..again.clone()
            },
            original
        );
        // A second failover resumes from the whole output so far.
        let third = resubmission(&original, &[70, 71, 72, 73]).unwrap();
        assert_eq!(third.resumed_tokens, 4);
        assert_eq!(third.stopping.unwrap().max_tokens, 6);
        // Nothing streamed yet: the original, marked as such.
        let fresh = resubmission(&original, &[]).unwrap();
        assert_eq!((fresh.input_ids.len(), fresh.resumed_tokens), (5, 0));
    }

    #[test]
    fn no_resubmission_once_max_tokens_are_streamed() {
        assert_eq!(resubmission(&original(), &[7; 10]), None);
        assert_eq!(resubmission(&original(), &[7; 11]), None);
        assert!(resubmission(&original(), &[7; 9]).is_some());
    }

    #[test]
    fn statuses_of_a_gone_member_are_told_from_final_answers() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Aborted,
            Code::Cancelled,
        ] {
            assert!(member_gone(&tonic::Status::new(code, "gone")), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::Internal,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::DeadlineExceeded,
        ] {
            assert!(!member_gone(&tonic::Status::new(code, "final")), "{code:?}");
        }
        // INTERNAL made by this side's transport carries its cause.
        let mut broken = tonic::Status::internal("h2 protocol error");
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        broken.set_source(std::sync::Arc::new(io));
        assert!(member_gone(&broken), "{broken:?}");
    }

    #[tokio::test]
    async fn a_call_goes_to_another_member_only_after_a_gone_status() {
        let members = ["a", "b", "c", "d"].map(|id| Member::new(Role::Scheduler, id, "x:1"));
        let pick = |exclude: &[String]| {
            members
                .iter()
                .find(|m| !exclude.contains(&m.id))
                .map(|m| (m.clone(), m.id.clone()))
                .ok_or(Error::NoMember(Role::Scheduler))
        };
        // a is gone, b answers.
        let mut failed = Failed::new(Role::Scheduler);
        let (member, answer) = call_with_retries(&mut failed, pick, |id: String| async move {
            match id.as_str() {
                "a" => Err(tonic::Status::unavailable("down")),
                _ => Ok(id),
            }
        })
        .await
        .unwrap();
        assert_eq!((member.id.as_str(), answer.as_str()), ("b", "b"));
        assert_eq!(failed.ids(), ["a"]);

        // A final answer is not retried.
        let mut failed = Failed::new(Role::Scheduler);
        let e = call_with_retries(&mut failed, pick, |_| async {
            Err::<(), _>(tonic::Status::invalid_argument("bad"))
        })
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Upstream { .. }), "{e:?}");
        assert!(failed.ids().is_empty());

        // Three members in all, then UNAVAILABLE naming them.
        let mut failed = Failed::new(Role::Scheduler);
        let e = call_with_retries(&mut failed, pick, |_| async {
            Err::<(), _>(tonic::Status::unknown("h2 protocol error"))
        })
        .await
        .unwrap_err();
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("a, b, c"), "{status:?}");
        assert!(status.message().contains("h2 protocol error"), "{status:?}");

        // Only the failed member is registered: UNAVAILABLE at once.
        let only_a = |exclude: &[String]| {
            pick(exclude).and_then(|(m, c)| match m.id.as_str() {
                "a" => Ok((m, c)),
                _ => Err(Error::NoMember(Role::Scheduler)),
            })
        };
        let mut failed = Failed::new(Role::Scheduler);
        let e = call_with_retries(&mut failed, only_a, |_| async {
            Err::<(), _>(tonic::Status::unavailable("down"))
        })
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Unserved { .. }), "{e:?}");
        assert_eq!(failed.ids(), ["a"]);
    }
}
