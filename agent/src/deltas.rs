// SPDX-License-Identifier: Apache-2.0
//! A watched kind turned into [`Delta`]s for a thread that keeps a view of
//! it: shared by the policy thread and the service thread.
//!
//! Objects are reduced (by the caller's `read`) as soon as they arrive, so
//! the channel and the views stay small. A list is buffered and sent whole
//! at `InitDone`: the thread replaces that kind's view then, so an object
//! deleted while the watch was down vanishes, and a thread can tell a kind
//! listed once from one that only saw changes.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use futures_util::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};

use crate::metrics::AgentState;

/// One kind's change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta<T> {
    /// A complete list: everything of this kind.
    Listed(Vec<T>),
    Applied(T),
    /// (namespace, name); the namespace is empty for a cluster-scoped kind.
    Deleted(String, String),
}

/// Turns watch events into deltas, buffering a list until it is whole.
pub struct Lister<K, T> {
    listing: Option<Vec<T>>,
    read: fn(&K) -> T,
}

impl<K: Resource, T> Lister<K, T> {
    pub fn new(read: fn(&K) -> T) -> Self {
        Lister {
            listing: None,
            read,
        }
    }

    pub fn apply(&mut self, event: Event<K>) -> Option<Delta<T>> {
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

/// Watches every object of one kind and sends each delta, wrapped as the
/// receiving thread wants it, until that thread goes away.
pub async fn watch_kind<K, T, U>(
    api: Api<K>,
    what: &'static str,
    read: fn(&K) -> T,
    wrap: fn(Delta<T>) -> U,
    updates: Sender<U>,
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

/// Applies one kind's delta to a view keyed by `key`; returns whether the
/// view changed (an object updated to what it was already, as Endpoints
/// used for leader election are every few seconds, is no change).
pub fn apply_delta<K: Ord, T: PartialEq>(
    map: &mut BTreeMap<K, T>,
    delta: Delta<T>,
    key: impl Fn(&T) -> K,
    deleted_key: impl Fn(String, String) -> K,
) -> bool {
    match delta {
        Delta::Listed(items) => {
            let listed: BTreeMap<K, T> = items.into_iter().map(|t| (key(&t), t)).collect();
            let changed = listed != *map;
            *map = listed;
            changed
        }
        Delta::Applied(t) => {
            let k = key(&t);
            if map.get(&k) == Some(&t) {
                return false;
            }
            map.insert(k, t);
            true
        }
        Delta::Deleted(ns, name) => map.remove(&deleted_key(ns, name)).is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Namespace;
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

    fn name(n: &Namespace) -> String {
        n.metadata.name.clone().unwrap_or_default()
    }

    #[test]
    fn a_list_is_sent_whole_and_changes_one_by_one() {
        let mut l = Lister::new(name);
        assert_eq!(l.apply(Event::Init), None);
        assert_eq!(l.apply(Event::InitApply(ns("a"))), None);
        assert_eq!(l.apply(Event::InitApply(ns("b"))), None);
        assert_eq!(
            l.apply(Event::InitDone),
            Some(Delta::Listed(vec!["a".into(), "b".into()]))
        );
        // A relist starts empty: what was deleted meanwhile is not in it.
        l.apply(Event::Init);
        assert_eq!(l.apply(Event::InitDone), Some(Delta::Listed(vec![])));
        assert_eq!(
            l.apply(Event::Apply(ns("c"))),
            Some(Delta::Applied("c".into()))
        );
        assert_eq!(
            l.apply(Event::Delete(ns("c"))),
            Some(Delta::Deleted(String::new(), "c".into()))
        );
    }

    #[test]
    fn applying_says_whether_the_view_changed() {
        let mut m: BTreeMap<String, (String, u32)> = BTreeMap::new();
        let key = |t: &(String, u32)| t.0.clone();
        let del = |_: String, n: String| n;
        assert!(apply_delta(
            &mut m,
            Delta::Listed(vec![("a".into(), 1)]),
            key,
            del
        ));
        assert!(!apply_delta(
            &mut m,
            Delta::Listed(vec![("a".into(), 1)]),
            key,
            del
        ));
        assert!(!apply_delta(
            &mut m,
            Delta::Applied(("a".into(), 1)),
            key,
            del
        ));
        assert!(apply_delta(
            &mut m,
            Delta::Applied(("a".into(), 2)),
            key,
            del
        ));
        assert_eq!(m["a"].1, 2);
        assert!(apply_delta(
            &mut m,
            Delta::Deleted(String::new(), "a".into()),
            key,
            del
        ));
        assert!(!apply_delta(
            &mut m,
            Delta::Deleted(String::new(), "a".into()),
            key,
            del
        ));
        // A list replaces the kind.
        apply_delta(&mut m, Delta::Applied(("b".into(), 1)), key, del);
        apply_delta(&mut m, Delta::Listed(vec![("c".into(), 1)]), key, del);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["c"]);
    }
}
