// SPDX-License-Identifier: Apache-2.0
//! The watch of all Nodes, turned into complete snapshots for the sync
//! thread.
//!
//! kube-runtime's watcher lists, then watches, and lists again after a
//! 410 Gone or an API server restart. A list arrives as `Init`, `InitApply`
//! per Node and `InitDone`; the cache buffers it and replaces its whole
//! view at `InitDone`, so a Node deleted while the watch was down vanishes
//! then. Nothing is sent before the first complete list: a partial view
//! would make the sync remove routes that are still wanted.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};

use crate::metrics::AgentState;
use crate::node::NodeInfo;
use crate::sync::Snapshot;

/// The agent's view of the Nodes.
#[derive(Debug, Default)]
pub struct NodeCache {
    nodes: BTreeMap<String, NodeInfo>,
    relisting: Option<BTreeMap<String, NodeInfo>>,
    listed: bool,
}

impl NodeCache {
    /// Applies one watch event; returns a snapshot when the view changed
    /// (always after a complete list), and the Node's parse warnings.
    pub fn apply(&mut self, event: Event<Node>) -> (Option<Snapshot>, Vec<String>) {
        let mut warnings = Vec::new();
        let mut read = |node: &Node| {
            let (info, w) = NodeInfo::from_node(node);
            warnings.extend(w);
            info
        };
        let snapshot = match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                None
            }
            Event::InitApply(node) => {
                let info = read(&node);
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(info.name.clone(), info);
                None
            }
            Event::InitDone => {
                self.nodes = self.relisting.take().unwrap_or_default();
                self.listed = true;
                Some(Snapshot {
                    relisted: true,
                    ..self.snapshot()
                })
            }
            Event::Apply(node) => {
                let info = read(&node);
                if self.nodes.get(&info.name) == Some(&info) {
                    None
                } else {
                    self.nodes.insert(info.name.clone(), info);
                    self.listed.then(|| self.snapshot())
                }
            }
            Event::Delete(node) => {
                let name = node.metadata.name.unwrap_or_default();
                match self.nodes.remove(&name) {
                    Some(_) => self.listed.then(|| self.snapshot()),
                    None => None,
                }
            }
        };
        (snapshot, warnings)
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            nodes: self.nodes.values().cloned().collect(),
            relisted: false,
        }
    }
}

/// Watches all Nodes until the sync thread goes away; API errors are
/// counted and logged, and the watcher retries with backoff.
pub async fn watch_nodes(client: Client, updates: Sender<Snapshot>, state: Arc<AgentState>) {
    let api: Api<Node> = Api::all(client);
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut cache = NodeCache::default();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                let relist_done = matches!(event, Event::InitDone);
                let (snapshot, warnings) = cache.apply(event);
                for w in warnings {
                    log::warn!("{w}");
                }
                if let Some(s) = snapshot {
                    if relist_done {
                        log::info!("listed {} Nodes", s.nodes.len());
                    }
                    if updates.send(s).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                state.api_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("watching Nodes: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::tests::node;

    fn names(s: &Snapshot) -> Vec<&str> {
        s.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn nothing_before_the_first_complete_list() {
        let mut c = NodeCache::default();
        assert!(c.apply(Event::Apply(node("a", &[], &[]))).0.is_none());
        assert!(c.apply(Event::Init).0.is_none());
        assert!(c
            .apply(Event::InitApply(node(
                "b",
                &["10.244.2.0/24"],
                &["192.0.2.2"]
            )))
            .0
            .is_none());
        let s = c.apply(Event::InitDone).0.unwrap();
        assert_eq!(names(&s), ["b"], "the list replaces what came before it");
        assert!(s.relisted);
        let s = c.apply(Event::Apply(node("c", &[], &[]))).0.unwrap();
        assert!(!s.relisted);
    }

    #[test]
    fn a_relist_drops_nodes_deleted_meanwhile() {
        let mut c = NodeCache::default();
        c.apply(Event::Init);
        c.apply(Event::InitApply(node("a", &[], &[])));
        c.apply(Event::InitApply(node("b", &[], &[])));
        assert_eq!(names(&c.apply(Event::InitDone).0.unwrap()), ["a", "b"]);
        // The API server restarted; b went away in the meantime.
        c.apply(Event::Init);
        c.apply(Event::InitApply(node("a", &[], &[])));
        assert_eq!(names(&c.apply(Event::InitDone).0.unwrap()), ["a"]);
    }

    #[test]
    fn only_changes_that_matter_make_a_snapshot() {
        let mut c = NodeCache::default();
        c.apply(Event::Init);
        c.apply(Event::InitApply(node(
            "a",
            &["10.244.1.0/24"],
            &["192.0.2.1"],
        )));
        c.apply(Event::InitDone);
        // A status heartbeat: same CIDRs and addresses.
        let mut same = node("a", &["10.244.1.0/24"], &["192.0.2.1"]);
        same.metadata.resource_version = Some("99".into());
        assert!(c.apply(Event::Apply(same)).0.is_none());
        let s = c
            .apply(Event::Apply(node("a", &["10.244.1.0/24"], &["192.0.2.9"])))
            .0
            .unwrap();
        assert_eq!(
            s.nodes[0].internal_ips,
            vec!["192.0.2.9".parse::<std::net::IpAddr>().unwrap()]
        );
        let s = c.apply(Event::Apply(node("c", &[], &[]))).0.unwrap();
        assert_eq!(names(&s), ["a", "c"]);
        let s = c.apply(Event::Delete(node("a", &[], &[]))).0.unwrap();
        assert_eq!(names(&s), ["c"]);
        assert!(c.apply(Event::Delete(node("zz", &[], &[]))).0.is_none());
    }

    #[test]
    fn parse_problems_come_back_as_warnings() {
        let mut c = NodeCache::default();
        let (_, w) = c.apply(Event::InitApply(node("a", &["bad"], &[])));
        assert_eq!(w.len(), 1);
    }
}
