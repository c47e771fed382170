// SPDX-License-Identifier: Apache-2.0
//! The watches Service load balancing needs (all Services and Endpoints),
//! each turned into [`Update`]s for the service thread.
//!
//! Objects are reduced on arrival to what the table is computed from; a
//! list is sent whole, and the thread programs nothing before both kinds
//! were listed once (a Service seen without its Endpoints would be
//! programmed with no backends and reject its clients).

use std::sync::mpsc::Sender;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{Api, Client};

use super::model::{EndpointsInfo, ServiceInfo};
use crate::deltas::watch_kind;
pub use crate::deltas::Delta;
use crate::metrics::AgentState;

/// What the service thread is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    Services(Delta<ServiceInfo>),
    Endpoints(Delta<EndpointsInfo>),
}

/// Watches all Services and Endpoints until the service thread goes away.
pub async fn watch_service_inputs(client: Client, updates: Sender<Update>, state: Arc<AgentState>) {
    let services = watch_kind(
        Api::<Service>::all(client.clone()),
        "Services",
        ServiceInfo::from_api,
        Update::Services,
        updates.clone(),
        state.clone(),
    );
    let endpoints = watch_kind(
        Api::<Endpoints>::all(client),
        "Endpoints",
        EndpointsInfo::from_api,
        Update::Endpoints,
        updates,
        state,
    );
    tokio::join!(services, endpoints);
}
