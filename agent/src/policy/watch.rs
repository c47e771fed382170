// SPDX-License-Identifier: Apache-2.0
//! The watches NetworkPolicy needs (all Pods, Namespaces and
//! NetworkPolicies), each turned into [`Update`]s for the policy thread.
//!
//! Objects are reduced to what the compiler reads as soon as they arrive
//! (a Pod's labels, node, addresses and named ports), so the channel and
//! the view stay small. A list is buffered and sent whole at `InitDone`:
//! the policy thread replaces that kind's view then, and does not program
//! anything before all three kinds were listed once (a partial view could
//! open what a policy closes).

use std::sync::mpsc::Sender;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::{Api, Client};

use super::model::{NamespaceInfo, PodInfo, PolicyInfo};
use crate::deltas::watch_kind;
pub use crate::deltas::Delta;
use crate::metrics::AgentState;

/// What the policy thread is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    Pods(Delta<PodInfo>),
    Namespaces(Delta<NamespaceInfo>),
    Policies(Delta<PolicyInfo>),
    /// ADD made an endpoint in a namespace with policies: host veth,
    /// CLOCK_MONOTONIC nanoseconds when it set the policy (0: unknown), and
    /// whether it waits for the agent (else it found the policy computed
    /// ahead).
    Reported {
        ifindex: u32,
        since_ns: u64,
        pending: bool,
    },
}

/// Watches all Pods, Namespaces and NetworkPolicies until the policy
/// thread goes away.
pub async fn watch_policy_inputs(client: Client, updates: Sender<Update>, state: Arc<AgentState>) {
    let pods = watch_kind(
        Api::<Pod>::all(client.clone()),
        "Pods",
        PodInfo::from_api,
        Update::Pods,
        updates.clone(),
        state.clone(),
    );
    let namespaces = watch_kind(
        Api::<Namespace>::all(client.clone()),
        "Namespaces",
        NamespaceInfo::from_api,
        Update::Namespaces,
        updates.clone(),
        state.clone(),
    );
    let policies = watch_kind(
        Api::<NetworkPolicy>::all(client),
        "NetworkPolicies",
        PolicyInfo::from_api,
        Update::Policies,
        updates,
        state,
    );
    tokio::join!(pods, namespaces, policies);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deltas::Lister;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::watcher::Event;

    #[test]
    fn namespaces_are_reduced_on_arrival() {
        let mut l = Lister::new(NamespaceInfo::from_api);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some("a".into()),
                labels: Some([("team".to_string(), "x".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let Some(Delta::Applied(n)) = l.apply(Event::Apply(ns)) else {
            panic!("no change");
        };
        assert_eq!(n.name, "a");
        assert_eq!(n.labels["team"], "x");
    }
}
