//! Pending RPC calls: a request id maps to the caller waiting for its answer. The session
//! completes calls as answers arrive and fails a gateway's calls at once when it goes offline;
//! the caller's [`CallGuard`] removes the entry on every path, so nothing leaks.

use gatewayd_protocol::{GatewayId, RequestId, RpcError, RpcOutcome};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, Notify};

struct Pending {
    gateway: GatewayId,
    tx: oneshot::Sender<RpcOutcome>,
}

/// The table of calls awaiting an answer. Critical sections are a single map operation.
#[derive(Default)]
pub struct PendingCalls {
    map: Mutex<HashMap<RequestId, Pending>>,
    emptied: Notify,
}

/// Removes its call from the table when dropped (answered, timed out, or the caller went away).
pub struct CallGuard {
    calls: Arc<PendingCalls>,
    id: RequestId,
}

impl PendingCalls {
    /// Registers a call to `gateway`; the receiver gets its outcome.
    pub fn register(
        self: &Arc<Self>,
        id: RequestId,
        gateway: GatewayId,
    ) -> (CallGuard, oneshot::Receiver<RpcOutcome>) {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id.clone(), Pending { gateway, tx });
        let guard = CallGuard {
            calls: Arc::clone(self),
            id,
        };
        (guard, rx)
    }

    /// Delivers an answer from gateway `from`. Returns false when no call to that gateway
    /// waits for `id` (unknown, already timed out, or another gateway answering).
    pub fn complete(&self, from: &GatewayId, id: &RequestId, outcome: RpcOutcome) -> bool {
        let pending = self.take(|map| match map.get(id) {
            Some(p) if &p.gateway == from => map.remove(id).into_iter().collect(),
            _ => Vec::new(),
        });
        match pending.into_iter().next() {
            Some(p) => {
                let _ = p.tx.send(outcome);
                true
            }
            None => false,
        }
    }

    /// Fails every call to `gateway` with `error`. Returns how many there were.
    pub fn fail_gateway(&self, gateway: &GatewayId, error: &RpcError) -> usize {
        let pending = self.take(|map| {
            let ids: Vec<RequestId> = map
                .iter()
                .filter(|(_, p)| &p.gateway == gateway)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        });
        Self::fail(pending, error)
    }

    /// Fails every pending call with `error`. Returns how many there were.
    pub fn fail_all(&self, error: &RpcError) -> usize {
        let pending = self.take(|map| map.drain().map(|(_, p)| p).collect());
        Self::fail(pending, error)
    }

    /// How many calls are waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no call is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once no call is waiting (for the shutdown drain).
    pub async fn wait_idle(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }

    fn fail(pending: Vec<Pending>, error: &RpcError) -> usize {
        let n = pending.len();
        for p in pending {
            let _ = p.tx.send(RpcOutcome::Error(error.clone()));
        }
        n
    }

    fn take(
        &self,
        f: impl FnOnce(&mut HashMap<RequestId, Pending>) -> Vec<Pending>,
    ) -> Vec<Pending> {
        let mut map = self.lock();
        let taken = f(&mut map);
        if map.is_empty() {
            self.emptied.notify_waiters();
        }
        taken
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RequestId, Pending>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.calls
            .take(|map| map.remove(&self.id).into_iter().collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatewayd_protocol::{ErrorCode, RpcSuccess};

    fn rid(s: &str) -> RequestId {
        RequestId::new(s).unwrap()
    }

    fn gw(s: &str) -> GatewayId {
        GatewayId::new(s).unwrap()
    }

    fn ok() -> RpcOutcome {
        RpcOutcome::Ok(RpcSuccess {
            status: 200,
            result: serde_json::json!(1),
        })
    }

    #[tokio::test]
    async fn an_answer_reaches_its_caller_and_the_guard_cleans_up() {
        let calls = Arc::new(PendingCalls::default());
        let (guard, rx) = calls.register(rid("r1"), gw("g1"));
        assert!(
            !calls.complete(&gw("g2"), &rid("r1"), ok()),
            "foreign gateway"
        );
        assert!(calls.complete(&gw("g1"), &rid("r1"), ok()));
        assert_eq!(rx.await.unwrap(), ok());
        assert!(
            !calls.complete(&gw("g1"), &rid("r1"), ok()),
            "answered twice"
        );
        drop(guard);
        assert!(calls.is_empty());
    }

    #[test]
    fn a_dropped_guard_removes_an_unanswered_call() {
        let calls = Arc::new(PendingCalls::default());
        let (guard, _rx) = calls.register(rid("r1"), gw("g1"));
        assert_eq!(calls.len(), 1);
        drop(guard);
        assert!(calls.is_empty());
        assert!(
            !calls.complete(&gw("g1"), &rid("r1"), ok()),
            "late answer dropped"
        );
    }

    #[tokio::test]
    async fn going_offline_fails_only_that_gateways_calls() {
        let calls = Arc::new(PendingCalls::default());
        let (_g1, rx1) = calls.register(rid("r1"), gw("g1"));
        let (_g2, mut rx2) = calls.register(rid("r2"), gw("g2"));
        let err = RpcError::new(ErrorCode::GatewayOffline, "gateway g1 went offline");
        assert_eq!(calls.fail_gateway(&gw("g1"), &err), 1);
        assert_eq!(rx1.await.unwrap(), RpcOutcome::Error(err));
        assert!(rx2.try_recv().is_err());
        assert_eq!(calls.len(), 1);
    }

    #[tokio::test]
    async fn wait_idle_resolves_when_the_last_call_ends() {
        let calls = Arc::new(PendingCalls::default());
        calls.wait_idle().await;
        let (guard, _rx) = calls.register(rid("r1"), gw("g1"));
        let waiter = tokio::spawn({
            let calls = Arc::clone(&calls);
            async move { calls.wait_idle().await }
        });
        tokio::task::yield_now().await;
        drop(guard);
        waiter.await.unwrap();
    }
}
