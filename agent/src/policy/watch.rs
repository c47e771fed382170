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

use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};

use super::model::{NamespaceInfo, PodInfo, PolicyInfo};
use crate::metrics::AgentState;

/// One kind's change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta<T> {
    /// A complete list: everything of this kind.
    Listed(Vec<T>),
    Applied(T),
    /// (namespace, name); the namespace is empty for a Namespace.
    Deleted(String, String),
}

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

/// Turns watch events into deltas, buffering a list until it is whole.
struct Lister<K, T> {
    listing: Option<Vec<T>>,
    read: fn(&K) -> T,
}

impl<K: Resource, T> Lister<K, T> {
    fn new(read: fn(&K) -> T) -> Self {
        Lister {
            listing: None,
            read,
        }
    }

    fn apply(&mut self, event: Event<K>) -> Option<Delta<T>> {
        match event {
            Event::Init => {
                self.listing = Some(Vec::new());
                None
            }
            Event::InitApply(obj) => {
                let item = (self.read)(&obj);
                self.listing.get_or_insert_with(Vec::new).push(item);
                None
            }
            Event::InitDone => Some(Delta::Listed(self.listing.take().unwrap_or_default())),
            Event::Apply(obj) => Some(Delta::Applied((self.read)(&obj))),
            Event::Delete(obj) => {
                let meta = obj.meta();
                Some(Delta::Deleted(
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                ))
            }
        }
    }
}

async fn watch_kind<K, T>(
    api: Api<K>,
    what: &'static str,
    read: fn(&K) -> T,
    wrap: fn(Delta<T>) -> Update,
    updates: Sender<Update>,
    state: Arc<AgentState>,
) where
    K: Resource
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + Send
        + 'static,
{
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut lister = Lister::new(read);
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if let Some(delta) = lister.apply(event) {
                    if let Delta::Listed(items) = &delta {
                        log::info!("listed {} {what}", items.len());
                    }
                    if updates.send(wrap(delta)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                state.api_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("watching {what}: {e}");
            }
        }
    }
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
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ns(name: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_list_is_sent_whole_and_changes_one_by_one() {
        let mut l = Lister::new(NamespaceInfo::from_api);
        assert_eq!(l.apply(Event::Init), None);
        assert_eq!(l.apply(Event::InitApply(ns("a"))), None);
        assert_eq!(l.apply(Event::InitApply(ns("b"))), None);
        let Some(Delta::Listed(items)) = l.apply(Event::InitDone) else {
            panic!("no list");
        };
        let names: Vec<_> = items.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        // A relist starts empty: what was deleted meanwhile is not in it.
        l.apply(Event::Init);
        let Some(Delta::Listed(items)) = l.apply(Event::InitDone) else {
            panic!("no list");
        };
        assert!(items.is_empty());
        assert!(matches!(
            l.apply(Event::Apply(ns("c"))),
            Some(Delta::Applied(n)) if n.name == "c"
        ));
        assert_eq!(
            l.apply(Event::Delete(ns("c"))),
            Some(Delta::Deleted(String::new(), "c".into()))
        );
    }
}
