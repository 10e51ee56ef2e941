//! Holding one registration in etcd: a lease kept alive, the member's key put
//! under it (only if no other lease holds the key), both re-created when the
//! lease is lost, and the lease revoked when the registration is released.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio_util::sync::CancellationToken;

use super::{CALL_TIMEOUT, RETRY, pause_unless_stopped, within};
use crate::discovery::Member;
use crate::error::Error;

/// Why holding the registration stopped for now.
enum Interruption {
    /// etcd no longer knows the lease (expired, or etcd lost its data).
    LeaseLost,
    /// Another lease holds the member's key.
    Taken,
    /// etcd failed or did not answer.
    Failed(Error),
}

/// Keeps `member` under `key` with a lease of `ttl_secs` until `stop`, then
/// revokes the lease (best effort: otherwise it expires).
pub(super) async fn keep_registered(
    mut client: Client,
    key: String,
    member: Member,
    ttl_secs: i64,
    stop: CancellationToken,
) {
    let value = serde_json::to_vec(&member).expect("a member always serializes");
    let mut lease = None;
    let mut warned_taken = false;
    loop {
        let interruption = tokio::select! {
            _ = stop.cancelled() => break,
            interruption = hold(&mut client, &key, &value, ttl_secs, &mut lease) => interruption,
        };
        match interruption {
            Interruption::LeaseLost => {
                tracing::warn!(%member, "the etcd lease was lost; registering again")
            }
            Interruption::Taken if !warned_taken => {
                warned_taken = true;
                tracing::warn!(
                    %member,
                    "another live registration holds this id in etcd; waiting until its lease ends"
                );
            }
            Interruption::Taken => {}
            Interruption::Failed(e) => {
                tracing::warn!(%member, error = %e, "cannot keep the etcd registration; retrying")
            }
        }
        if !pause_unless_stopped(RETRY, &stop).await {
            break;
        }
    }
    if let Some(id) = lease {
        match within("lease revoke", client.lease_revoke(id)).await {
            Ok(_) => tracing::debug!(%member, "deregistered from etcd"),
            Err(e) => tracing::warn!(
                %member,
                error = %e,
                "cannot revoke the etcd lease; the member leaves when it expires"
            ),
        }
    }
}

/// Gets (or re-grants) the lease, claims the key, then keeps the lease alive
/// until something goes wrong.
async fn hold(
    client: &mut Client,
    key: &str,
    value: &[u8],
    ttl_secs: i64,
    lease: &mut Option<i64>,
) -> Interruption {
    let id = match *lease {
        Some(id) => id,
        None => match within("lease grant", client.lease_grant(ttl_secs, None)).await {
            Ok(granted) => *lease.insert(granted.id()),
            Err(e) => return Interruption::Failed(e),
        },
    };
    let failed = |what, cause: String| Interruption::Failed(Error::Etcd { what, cause });
    let (mut keeper, mut answers) =
        match tokio::time::timeout(CALL_TIMEOUT, client.lease_keep_alive(id)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => {
                *lease = None;
                return Interruption::LeaseLost;
            }
            Ok(Err(e)) => return failed("lease keep-alive", e.to_string()),
            Err(_) => return failed("lease keep-alive", "no answer".into()),
        };

    // Put the member unless another lease holds the key; holding it already
    // (after a broken connection) is fine.
    let claim = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(id)),
        )])
        .or_else([TxnOp::get(key, None)]);
    match within("member put", client.txn(claim)).await {
        Ok(answer) if answer.succeeded() || held_by(&answer.op_responses(), id) => {}
        Ok(_) => return Interruption::Taken,
        Err(e) => return Interruption::Failed(e),
    }
    tracing::debug!(key, lease = id, "registered in etcd");

    let period = Duration::from_millis(ttl_secs.unsigned_abs() * 1000 / 3);
    loop {
        tokio::time::sleep(period).await;
        if let Err(e) = keeper.keep_alive().await {
            return failed("lease keep-alive", e.to_string());
        }
        match tokio::time::timeout(CALL_TIMEOUT, answers.message()).await {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
            Ok(Ok(Some(_))) => {
                *lease = None;
                return Interruption::LeaseLost;
            }
            Ok(Ok(None)) => return failed("lease keep-alive", "the stream ended".into()),
            Ok(Err(e)) => return failed("lease keep-alive", e.to_string()),
            Err(_) => return failed("lease keep-alive", "no answer".into()),
        }
    }
}

/// Whether the `get` of a failed claim shows the key under lease `id`.
fn held_by(responses: &[TxnOpResponse], id: i64) -> bool {
    responses.iter().any(|response| match response {
        TxnOpResponse::Get(get) => get.kvs().first().is_some_and(|kv| kv.lease() == id),
        TxnOpResponse::Put(_) | TxnOpResponse::Delete(_) | TxnOpResponse::Txn(_) => false,
    })
}
