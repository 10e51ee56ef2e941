//! The members the gateway calls: vision-workers and schedulers from discovery,
//! picked round-robin among those a request has not seen fail, each reached over
//! one lazily connected, cached channel with the raised message limits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::CancelRequest;
use tessera_proto::internal::v1::scheduler_client::SchedulerClient;
use tessera_proto::internal::v1::vision_client::VisionClient;
use tessera_runtime::tls::{self, ClusterTls};
use tessera_runtime::{Discovery, Member, Role, telemetry};
use tonic::transport::Channel;

use crate::error::{Error, Result};

/// How long connecting to a member may take before the call fails UNAVAILABLE.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a `Scheduler.Cancel` may take; it is best effort.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Picks members from discovery and hands out clients to them.
pub struct Upstream {
    discovery: Arc<dyn Discovery>,
    /// The cluster's mutual TLS for calls to members (`None`: plaintext).
    tls: Option<Arc<ClusterTls>>,
    channels: Mutex<HashMap<String, Channel>>,
    next_vision: AtomicUsize,
    next_scheduler: AtomicUsize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Upstream")
            .field("channels", &channels.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Members come from `discovery`.
    pub fn new(discovery: Arc<dyn Discovery>, tls: Option<Arc<ClusterTls>>) -> Self {
        Self {
            discovery,
            tls,
            channels: Mutex::new(HashMap::new()),
            next_vision: AtomicUsize::new(0),
            next_scheduler: AtomicUsize::new(0),
        }
    }

    /// The discovery this gateway reads members from.
    pub fn discovery(&self) -> &dyn Discovery {
        self.discovery.as_ref()
    }

    /// The next vision-worker, round-robin, whose id is not in `exclude` (those that
    /// failed the request), and a client to it. [`Error::NoMember`] when none is left.
    pub fn vision_except(&self, exclude: &[String]) -> Result<(Member, VisionClient<Channel>)> {
        let member = self.pick(Role::VisionWorker, &self.next_vision, exclude)?;
        let client = VisionClient::new(self.channel(&member)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok((member, client))
    }

    /// The next scheduler, round-robin, whose id is not in `exclude` (those that
    /// failed the request), and a client to it. [`Error::NoMember`] when none is left.
    pub fn scheduler_except(
        &self,
        exclude: &[String],
    ) -> Result<(Member, SchedulerClient<Channel>)> {
        let member = self.pick(Role::Scheduler, &self.next_scheduler, exclude)?;
        let client = scheduler_client(self.channel(&member)?);
        Ok((member, client))
    }

    /// Asks `scheduler` to cancel `request_id`, in the background; failures are logged.
    pub fn cancel(&self, scheduler: &Member, request_id: &str) {
        let channel = match self.channel(scheduler) {
            Ok(channel) => channel,
            Err(e) => {
                tracing::warn!(error = %e, "cannot cancel on the scheduler");
                return;
            }
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let request_id = request_id.to_owned();
        let scheduler = scheduler.id.clone();
        runtime.spawn(async move {
            let mut client = scheduler_client(channel);
            let mut request = telemetry::request_with_id(
                CancelRequest {
                    request_id: request_id.clone(),
                },
                &request_id,
            );
            request.set_timeout(CANCEL_TIMEOUT);
            match client.cancel(request).await {
                Ok(r) => tracing::debug!(
                    %request_id, %scheduler, found = r.get_ref().found, "cancelled on the scheduler"
                ),
                Err(status) => tracing::warn!(
                    %request_id, %scheduler, %status, "cancel on the scheduler failed"
                ),
            }
        });
    }

    /// The next registered member with `role` and an id not in `exclude`, counting
    /// with `next`.
    fn pick(&self, role: Role, next: &AtomicUsize, exclude: &[String]) -> Result<Member> {
        let members: Vec<Member> = self
            .discovery
            .members()
            .into_iter()
            .filter(|m| m.role == role && !exclude.contains(&m.id))
            .collect();
        if members.is_empty() {
            return Err(Error::NoMember(role));
        }
        let i = next.fetch_add(1, Ordering::Relaxed) % members.len();
        Ok(members[i].clone())
    }

    /// The cached channel to `member`'s address, created (unconnected) on first use.
    /// Channels to addresses no longer in discovery are dropped on the way.
    fn channel(&self, member: &Member) -> Result<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(&member.address) {
            return Ok(channel.clone());
        }
        let live = self.discovery.members();
        channels.retain(|address, _| live.iter().any(|m| &m.address == address));
        let endpoint =
            tls::endpoint(&member.address, self.tls.as_deref()).map_err(|_| Error::BadAddress {
                role: member.role,
                id: member.id.clone(),
                address: member.address.clone(),
            })?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(member.address.clone(), channel.clone());
        Ok(channel)
    }
}

fn scheduler_client(channel: Channel) -> SchedulerClient<Channel> {
    SchedulerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_runtime::MemoryDiscovery;

    #[tokio::test]
    async fn members_are_picked_round_robin_per_role() {
        let discovery = Arc::new(MemoryDiscovery::new());
        let upstream = Upstream::new(discovery.clone(), None);
        assert!(matches!(
            upstream.scheduler_except(&[]),
            Err(Error::NoMember(Role::Scheduler))
        ));
        let _a = discovery
            .register(Member::new(Role::Scheduler, "s-a", "127.0.0.1:1"))
            .unwrap();
        let _b = discovery
            .register(Member::new(Role::Scheduler, "s-b", "127.0.0.1:2"))
            .unwrap();
        let _v = discovery
            .register(Member::new(Role::VisionWorker, "v", "127.0.0.1:3"))
            .unwrap();
        let pick = |exclude: &[String]| upstream.scheduler_except(exclude).unwrap().0.id;
        let picked: Vec<String> = (0..4).map(|_| pick(&[])).collect();
        assert_eq!(picked, ["s-a", "s-b", "s-a", "s-b"]);
        assert_eq!(upstream.vision_except(&[]).unwrap().0.id, "v");
        assert!(matches!(
            Upstream::new(discovery.clone(), None).channel(&Member::new(
                Role::Scheduler,
                "x",
                "bad address"
            )),
            Err(Error::BadAddress { .. })
        ));
        assert_eq!(upstream.channels.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn failed_members_are_skipped_and_none_left_is_no_member() {
        let discovery = Arc::new(MemoryDiscovery::new());
        let upstream = Upstream::new(discovery.clone(), None);
        let _a = discovery
            .register(Member::new(Role::Scheduler, "s-a", "127.0.0.1:1"))
            .unwrap();
        let _b = discovery
            .register(Member::new(Role::Scheduler, "s-b", "127.0.0.1:2"))
            .unwrap();
        let failed = ["s-a".to_string()];
        for _ in 0..3 {
            assert_eq!(upstream.scheduler_except(&failed).unwrap().0.id, "s-b");
        }
        let both = ["s-b".to_string(), "s-a".to_string()];
        assert!(matches!(
            upstream.scheduler_except(&both),
            Err(Error::NoMember(Role::Scheduler))
        ));
        assert!(matches!(
            upstream.vision_except(&[]),
            Err(Error::NoMember(Role::VisionWorker))
        ));
    }
}
